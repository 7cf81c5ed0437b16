//! Email attachments' addresses: a part's content is stored with its message (in the store, named
//! by its SHA-256, once per content, see [`AttachmentContent`]) and referenced on the bus by a URL
//! under the daemon's public address, which agents and admins fetch with their tokens.

use crate::store::AttachmentContent;

/// The URL path attachments are served under.
pub const ATTACHMENT_PATH: &str = "/v1/channels/email/attachments";

/// Makes attachment URLs: `<public url>/v1/channels/email/attachments/<sha256>`.
#[derive(Debug, Clone)]
pub struct AttachmentLinks {
    /// `<public url>/v1/channels/email/attachments`, no trailing slash.
    base_url: String,
}

impl AttachmentLinks {
    pub fn new(public_url: &str) -> AttachmentLinks {
        AttachmentLinks {
            base_url: format!("{}{ATTACHMENT_PATH}", public_url.trim_end_matches('/')),
        }
    }

    /// The URL an attachment is served at.
    pub fn url(&self, attachment: &AttachmentContent) -> String {
        format!("{}/{}", self.base_url, attachment.sha256())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn an_attachment_is_named_and_linked_by_its_hash() {
        let links = AttachmentLinks::new("http://sb.example.com/");
        let attachment = AttachmentContent::new(b"hello".to_vec());
        let key = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        assert_eq!(attachment.sha256(), key);
        assert_eq!(
            links.url(&attachment),
            format!("http://sb.example.com/v1/channels/email/attachments/{key}")
        );
        assert!(AttachmentContent::is_name(key));
        assert!(!AttachmentContent::is_name("../etc/passwd"));
        assert!(!AttachmentContent::is_name(&key.to_uppercase()));
    }
}
