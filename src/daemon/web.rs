//! The browser side, embedded in the binary: the chat widget and its demo page, the agent console
//! and the supervisor view (plain JavaScript and CSS under `src/daemon/web/`, no build step).

use axum::http::header;
use axum::response::{IntoResponse, Response};

const WIDGET_JS: &str = include_str!("web/widget.js");
const DEMO_HTML: &str = include_str!("web/demo.html");
const CONSOLE_HTML: &str = include_str!("web/console.html");
const CONSOLE_JS: &str = include_str!("web/console.js");
const CONSOLE_CSS: &str = include_str!("web/console.css");
const SUPERVISOR_HTML: &str = include_str!("web/supervisor.html");
const SUPERVISOR_JS: &str = include_str!("web/supervisor.js");

const JAVASCRIPT: &str = "text/javascript; charset=utf-8";

/// A script or style sheet. The widget may be loaded by any site.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// A page of our own: not framed, scripts only from this server and none inline, so a customer
/// text that slipped into the DOM as HTML could not run.
fn page(body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
            ),
        ],
        body,
    )
        .into_response()
}

/// `GET /widget.js`.
pub async fn widget_js() -> Response {
    asset(JAVASCRIPT, WIDGET_JS)
}

/// `GET /demo`.
pub async fn demo() -> Response {
    page(DEMO_HTML)
}

/// `GET /console`.
pub async fn console() -> Response {
    page(CONSOLE_HTML)
}

/// `GET /console/console.js`.
pub async fn console_js() -> Response {
    asset(JAVASCRIPT, CONSOLE_JS)
}

/// `GET /console/console.css`.
pub async fn console_css() -> Response {
    asset("text/css; charset=utf-8", CONSOLE_CSS)
}

/// `GET /console/supervisor`.
pub async fn supervisor() -> Response {
    page(SUPERVISOR_HTML)
}

/// `GET /console/supervisor.js`.
pub async fn supervisor_js() -> Response {
    asset(JAVASCRIPT, SUPERVISOR_JS)
}
