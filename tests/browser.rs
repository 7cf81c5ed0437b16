//! The web chat, the agent console and the supervisor view in a real browser: Debian's chromium,
//! driven by playwright-core (tests/browser/chat.cjs) against the real binary. `scripts/test`
//! installs chromium and playwright-core when they are missing. Screenshots go to a temporary
//! directory, or to the one `SWITCHBOARD_SCREENSHOTS` names (`SWITCHBOARD_SCREENSHOTS=docs/screenshots`
//! refreshes the README's), so a test run leaves the checkout as it was.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::Daemon;

/// Where playwright-core is installed: `SWITCHBOARD_BROWSER_DEPS` (a node_modules directory), or
/// the cache scripts/test fills.
fn node_modules() -> PathBuf {
    if let Some(dir) = std::env::var_os("SWITCHBOARD_BROWSER_DEPS") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").expect("HOME is set");
    PathBuf::from(home).join(".cache/switchboard/browser-tests/node_modules")
}

#[test]
fn a_customer_chats_from_the_demo_page_and_an_agent_answers_in_the_console() {
    let modules = node_modules();
    assert!(
        modules.join("playwright-core").is_dir(),
        "playwright-core is not installed in {}: run scripts/test (or npm install --prefix it tests/browser)",
        modules.display()
    );
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists(),
        "chromium is not installed: run scripts/test (or apt-get install -y chromium)"
    );
    let daemon = Daemon::start("");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let scratch = tempfile::tempdir().unwrap();
    let screenshots = std::env::var_os("SWITCHBOARD_SCREENSHOTS")
        .map_or_else(|| scratch.path().to_owned(), |dir| root.join(dir));
    std::fs::create_dir_all(&screenshots).unwrap();
    let output = Command::new("node")
        .arg(root.join("tests/browser/chat.cjs"))
        .arg(&daemon.base)
        .arg(&screenshots)
        .env("NODE_PATH", &modules)
        .output()
        .expect("run node");
    assert!(
        output.status.success(),
        "browser scenarios failed\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    for name in [
        "widget",
        "widget-offline",
        "console",
        "console-offer",
        "supervisor",
    ] {
        let shot = std::fs::read(screenshots.join(format!("{name}.png"))).unwrap();
        assert!(shot.starts_with(b"\x89PNG"), "{name}.png is not a PNG");
    }
}
