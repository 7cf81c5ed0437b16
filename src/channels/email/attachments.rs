//! The attachment store: email attachments saved on disk, one file per content (named by its
//! SHA-256, so a redelivered message writes nothing new), referenced on the bus by URL.
//!
//! A file is written to a temporary name, synced, then renamed, so a crash never leaves a partial
//! file under a final name; the store is written before the message is committed, so a stored
//! message's attachments are always there.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

#[derive(Debug, Clone)]
pub struct AttachmentStore {
    dir: PathBuf,
    /// `<public url>/v1/channels/email/attachments`, no trailing slash.
    base_url: String,
}

/// The URL path attachments are served under.
pub const ATTACHMENT_PATH: &str = "/v1/channels/email/attachments";

impl AttachmentStore {
    pub fn new(dir: PathBuf, public_url: &str) -> AttachmentStore {
        AttachmentStore {
            dir,
            base_url: format!("{}{ATTACHMENT_PATH}", public_url.trim_end_matches('/')),
        }
    }

    /// Saves `content` (if not already there) and returns its URL.
    pub fn save(&self, content: &[u8]) -> std::io::Result<String> {
        let key = hex::encode(Sha256::digest(content));
        let path = self.dir.join(&key);
        if !path.exists() {
            std::fs::create_dir_all(&self.dir)?;
            let temporary = self.dir.join(format!(".{key}.{}", ulid::Ulid::new()));
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(content)?;
            file.sync_all()?;
            std::fs::rename(&temporary, &path)?;
        }
        Ok(format!("{}/{key}", self.base_url))
    }

    /// The file of a key from a URL, if the key is a SHA-256 in hex (nothing else is ever looked up).
    pub fn path_of(&self, key: &str) -> Option<PathBuf> {
        let valid = key.len() == 64
            && key
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        valid.then(|| self.dir.join(key))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn content_is_saved_once_under_its_hash() {
        let dir = tempfile::tempdir().unwrap();
        let store = AttachmentStore::new(dir.path().join("att"), "http://sb.example.com/");
        let url = store.save(b"hello").unwrap();
        let key = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        assert_eq!(
            url,
            format!("http://sb.example.com/v1/channels/email/attachments/{key}")
        );
        assert_eq!(store.save(b"hello").unwrap(), url);
        assert_eq!(std::fs::read_dir(store.dir()).unwrap().count(), 1);
        assert_eq!(
            std::fs::read(store.path_of(key).unwrap()).unwrap(),
            b"hello"
        );
        assert!(store.path_of("../etc/passwd").is_none());
    }
}
