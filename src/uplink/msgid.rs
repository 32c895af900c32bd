//! The mirror's `Nats-Msg-Id`s and the per-node key that makes them
//! unforgeable.
//!
//! Owns: the id format `<node>:<stream>:<seq>:<tag>`, where `tag` is the
//! first [`TAG_BYTES`] bytes of HMAC-SHA256 (key: this node's id key)
//! over the node, the local stream, the local sequence and the payload,
//! base64url without padding; and the key file
//! (`<data_dir>/uplink/node.key`, 32 random bytes as hex, mode 0600).
//!
//! Why: the resync believes a hub message is a stored copy of local
//! message `seq` when it carries that message's id, and the hub's
//! duplicate window drops a publish whose id it already holds. Any hub
//! user allowed to publish into the hub stream's subjects could otherwise
//! write `<node>:<stream>:<seq>` ids of messages frond has not sent yet and
//! make frond skip (lose) them. With the tag:
//! - an id is believed only if its tag verifies against the hub message's
//!   own payload ([`IdKey::verify`]); forging one needs the key, which
//!   never leaves the node. A verified id is either frond's own publish or
//!   a byte-for-byte copy of it (which proves the original reached the
//!   hub);
//! - an id in the format before tags (`<node>:<stream>:<seq>`, from a
//!   frond before this change: [`untagged_seq`]) is believed only once the
//!   local message is read and its hub subject and payload equal the hub
//!   message's ([`content_digest`]); a forger must then publish the exact
//!   content, so the hub holds it. An upgrade thus resends nothing;
//! - an attacker cannot predict the id of a message not yet sent, so it
//!   cannot occupy it in the duplicate window either;
//! - 48 bits of tag: a forger must publish 2^47 guesses per message on
//!   average, each one a stored hub message.
//!
//! Atomic batches (ordered mode, `mirror_order.rs`) carry one tag for the
//! whole batch instead of one per message: the commit (last) message's id
//! is `<node>:<stream>:<first>-<last>:<tag>` ([`IdKey::batch_id`]), the tag
//! an HMAC over the node, the stream, the local range and the SHA-256 of
//! each payload of the range in order ([`payload_digest`]); the first
//! message keeps its own per-message id; the others carry none. A
//! deflate-compressed link cannot shrink a random tag, so this saves about
//! 9 bytes per message. Why it still identifies every message:
//! - the hub stores an atomic batch all or nothing, at consecutive
//!   sequences, commit last; so a commit message at hub seq `c` whose id
//!   verifies against the payloads of the hub messages at `c - n + 1 ..= c`
//!   (`n` = the range's length, all read by the resync scan, which reads
//!   this node's subjects in hub order) proves that those `n` messages are
//!   local `first..=last`, in order. Forging it needs the key; a replayed
//!   genuine commit (copied by a hub user who saw it in flight) verifies
//!   only after copies of all the batch's payloads, in order, which puts
//!   the batch's content on the hub — the same argument as for one id;
//! - a range longer than [`BATCH_ID_MAX`] or not consecutive in the scan is
//!   not believed; the resync never starts inside a batch (the cursor's hub
//!   seq stays before the first message the scan could not yet attribute);
//! - the duplicate window: every send starting at the same local message
//!   carries that message's same id, and a send whose outcome is unknown is
//!   repeated with the same range (a rule of the mirror), so the commit id
//!   is identical too; the hub refuses a batch holding an id it has
//!   (`atomic publish batch contains duplicate message id`) and the resync
//!   then finds the first copy.
//!
//! Ids of a frond before batch tags (a tag on every message) and before
//! tags (untagged) are still recognised on the hub: an upgrade sends
//! nothing again.
//!
//! The tag covers the payload, not the subject or headers: a hub stream's
//! subject transform or added headers do not make frond resend. Invariant:
//! the key is on disk (fsynced) before the first id made with it leaves,
//! and never changes while the file exists. Without the file (deleted)
//! the tagged ids on the hub are not believed: the messages after the
//! cursor are sent again (at most the last window; the hub's duplicate
//! window does not catch them since the ids differ).

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use ring::hmac;

/// Bytes of HMAC kept in an id (8 base64 characters).
pub const TAG_BYTES: usize = 6;
const KEY_LEN: usize = 32;

/// A node's id key.
#[derive(Clone)]
pub struct IdKey {
    bytes: [u8; KEY_LEN],
    key: hmac::Key,
}

impl fmt::Debug for IdKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IdKey(..)")
    }
}

impl PartialEq for IdKey {
    fn eq(&self, other: &IdKey) -> bool {
        self.bytes == other.bytes
    }
}

impl Eq for IdKey {}

fn b64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = c.iter().fold(0u32, |n, &b| (n << 8) | u32::from(b)) << (8 * (3 - c.len()));
        for i in 0..=c.len() {
            let v = (n >> (18 - 6 * i)) & 63;
            out.push(char::from(A.get(v as usize).copied().unwrap_or(b'A')));
        }
    }
    out
}

impl IdKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> IdKey {
        IdKey {
            bytes,
            key: hmac::Key::new(hmac::HMAC_SHA256, &bytes),
        }
    }

    /// The tag of local message `seq` of `stream` on `node` with `payload`.
    pub fn tag(&self, node: &str, stream: &str, seq: u64, payload: &[u8]) -> String {
        let mut c = hmac::Context::with_key(&self.key);
        for part in [node.as_bytes(), stream.as_bytes()] {
            c.update(&(part.len() as u64).to_be_bytes());
            c.update(part);
        }
        c.update(&seq.to_be_bytes());
        c.update(payload);
        let t = c.sign();
        b64url(t.as_ref().get(..TAG_BYTES).unwrap_or_default())
    }

    /// The `Nats-Msg-Id` of a local message.
    pub fn msg_id(&self, node: &str, stream: &str, seq: u64, payload: &[u8]) -> String {
        format!(
            "{node}:{stream}:{seq}:{}",
            self.tag(node, stream, seq, payload)
        )
    }

    /// The local sequence an id names, if it is one of ours for this node
    /// and stream and its tag verifies against `payload`. `Err(seq)`: it
    /// names local message `seq` but does not verify (forged, an older
    /// frond's format, or another key).
    pub fn verify(
        &self,
        node: &str,
        stream: &str,
        id: &str,
        payload: &[u8],
    ) -> Option<Result<u64, u64>> {
        let (seq, tag) = split(node, stream, id)?;
        let want = self.tag(node, stream, seq, payload);
        Some(if ct_eq(tag.unwrap_or(""), &want) {
            Ok(seq)
        } else {
            Err(seq)
        })
    }
}

/// SHA-256 of one payload: what a batch tag covers per message, and what
/// the resync keeps of each recent hub message to check one
/// ([`IdKey::verify_batch`]).
pub fn payload_digest(payload: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, payload);
    let mut out = [0u8; 32];
    for (o, b) in out.iter_mut().zip(d.as_ref()) {
        *o = *b;
    }
    out
}

impl IdKey {
    /// The tag of the atomic batch of local messages `first..=last` whose
    /// payloads have these [`payload_digest`]s (one per message, in
    /// order). Domain-separated from [`IdKey::tag`] by the second
    /// sequence, which a single id has not.
    pub fn batch_tag(
        &self,
        node: &str,
        stream: &str,
        (first, last): (u64, u64),
        digests: &[[u8; 32]],
    ) -> String {
        let mut c = hmac::Context::with_key(&self.key);
        c.update(b"batch");
        for part in [node.as_bytes(), stream.as_bytes()] {
            c.update(&(part.len() as u64).to_be_bytes());
            c.update(part);
        }
        c.update(&first.to_be_bytes());
        c.update(&last.to_be_bytes());
        c.update(&(digests.len() as u64).to_be_bytes());
        for d in digests {
            c.update(d);
        }
        let t = c.sign();
        b64url(t.as_ref().get(..TAG_BYTES).unwrap_or_default())
    }

    /// The `Nats-Msg-Id` of a batch's commit message:
    /// `<node>:<stream>:<first>-<last>:<tag>`.
    pub fn batch_id(
        &self,
        node: &str,
        stream: &str,
        range: (u64, u64),
        digests: &[[u8; 32]],
    ) -> String {
        let tag = self.batch_tag(node, stream, range, digests);
        format!("{node}:{stream}:{}-{}:{tag}", range.0, range.1)
    }

    /// Whether batch id `id` (split by [`batch_range`]) verifies against
    /// the payload digests of the hub messages that end with it (the
    /// batch's messages in hub order, commit last; `digests.len()` must
    /// be the range's length).
    pub fn verify_batch(&self, node: &str, stream: &str, id: &str, digests: &[[u8; 32]]) -> bool {
        let Some((range, tag)) = batch_split(node, stream, id) else {
            return false;
        };
        if range.1 - range.0 + 1 != digests.len() as u64 {
            return false;
        }
        let want = self.batch_tag(node, stream, range, digests);
        ct_eq(tag, &want)
    }
}

/// Constant-time comparison: how far a guess matched stays hidden.
fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Longest batch a batch id may name (nats-server's `max_batch_size`
/// ceiling, [`super::mirror::MAX_BATCH`]); a longer range is not ours.
pub const BATCH_ID_MAX: u64 = 1000;

fn batch_split<'a>(node: &str, stream: &str, id: &'a str) -> Option<((u64, u64), &'a str)> {
    let rest = id.strip_prefix(node)?.strip_prefix(':')?;
    let rest = rest.strip_prefix(stream)?.strip_prefix(':')?;
    let (range, tag) = rest.split_once(':')?;
    let (a, b) = range.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    if !digits(a) || !digits(b) {
        return None;
    }
    let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
    (a >= 1 && a <= b && b - a < BATCH_ID_MAX).then_some(((a, b), tag))
}

/// The local range `(first, last)` a batch commit's id names, if it is in
/// the batch format for this node and stream (whether it verifies is
/// [`IdKey::verify_batch`]'s question).
pub fn batch_range(node: &str, stream: &str, id: &str) -> Option<(u64, u64)> {
    batch_split(node, stream, id).map(|(r, _)| r)
}

/// `(seq, tag)` of an id naming a message of `stream` on `node`; `tag` is
/// `None` in the format before tags (`<node>:<stream>:<seq>`).
fn split<'a>(node: &str, stream: &str, id: &'a str) -> Option<(u64, Option<&'a str>)> {
    let rest = id.strip_prefix(node)?.strip_prefix(':')?;
    let rest = rest.strip_prefix(stream)?.strip_prefix(':')?;
    let (seq, tag) = match rest.split_once(':') {
        Some((seq, tag)) => (seq, Some(tag)),
        None => (rest, None),
    };
    if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((seq.parse().ok()?, tag))
}

/// The local sequence an id in the format before tags
/// (`<node>:<stream>:<seq>`, written by a frond older than the tags)
/// names. Such an id proves nothing by itself: it is believed only if the
/// hub message's subject and payload equal the local message's
/// ([`content_digest`] of both), which a forger can only produce by
/// copying content the hub already holds.
pub fn untagged_seq(node: &str, stream: &str, id: &str) -> Option<u64> {
    match split(node, stream, id)? {
        (seq, None) => Some(seq),
        (_, Some(_)) => None,
    }
}

/// SHA-256 over a message's hub subject and payload (length-prefixed):
/// what an untagged id's hub message must share with the local message.
pub fn content_digest(subject: &str, payload: &[u8]) -> [u8; 32] {
    let mut c = ring::digest::Context::new(&ring::digest::SHA256);
    c.update(&(subject.len() as u64).to_be_bytes());
    c.update(subject.as_bytes());
    c.update(payload);
    let mut out = [0u8; 32];
    for (o, b) in out.iter_mut().zip(c.finish().as_ref()) {
        *o = *b;
    }
    out
}

/// The key file's path.
pub fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("uplink").join("node.key")
}

fn parse_hex(text: &[u8]) -> Option<[u8; KEY_LEN]> {
    let text = text.trim_ascii();
    if text.len() != 2 * KEY_LEN {
        return None;
    }
    let mut k = [0u8; KEY_LEN];
    for (o, pair) in k.iter_mut().zip(text.chunks_exact(2)) {
        let s = std::str::from_utf8(pair).ok()?;
        *o = u8::from_str_radix(s, 16).ok()?;
    }
    Some(k)
}

/// A warning if the key file is readable or writable by group or other
/// users (anyone who reads it can forge this node's ids).
#[cfg(unix)]
fn mode_warning(path: &Path, meta: &std::fs::Metadata) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "uplink id key {} is accessible by other users (mode {mode:o}); whoever reads it can forge this node's message ids: run `chmod 600 {}`",
            path.display(),
            path.display()
        )
    })
}

#[cfg(not(unix))]
fn mode_warning(_path: &Path, _meta: &std::fs::Metadata) -> Option<String> {
    None
}

/// Load the node's id key, creating it (random, written to a temporary
/// file, fsynced, renamed, directory fsynced; `<data_dir>` fsynced when
/// `uplink/` is new) if there is none. Warns when an existing key is
/// accessible by other users.
pub fn load_or_create(data_dir: &Path) -> Result<IdKey, String> {
    let path = key_path(data_dir);
    let shown = path.display();
    match std::fs::read(&path) {
        Ok(b) => {
            if let Some(w) = std::fs::metadata(&path)
                .ok()
                .and_then(|m| mode_warning(&path, &m))
            {
                log::warn!("{w}");
            }
            return parse_hex(&b).map(IdKey::from_bytes).ok_or_else(|| {
                format!("uplink id key {shown} is damaged (it must hold 64 hex digits); remove it to make a new one (messages not yet confirmed on the hub are then sent again)")
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot read uplink id key {shown}: {e}")),
    }
    let mut k = [0u8; KEY_LEN];
    crate::store::crypt::random(&mut k).map_err(|e| e.to_string())?;
    let dir = data_dir.join("uplink");
    let tmp = dir.join("node.key.tmp");
    let write = || -> std::io::Result<()> {
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir)?;
            // The new directory's entry must survive a power loss too.
            std::fs::File::open(data_dir)?.sync_all()?;
        }
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            o.mode(0o600);
        }
        let mut f = o.open(&tmp)?;
        let text: String = k.iter().map(|b| format!("{b:02x}")).collect();
        f.write_all(format!("{text}\n").as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&dir)?.sync_all()
    };
    write().map_err(|e| format!("cannot create uplink id key {shown}: {e}"))?;
    Ok(IdKey::from_bytes(k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_verify_only_with_the_key_and_the_payload() {
        let k = IdKey::from_bytes([7; 32]);
        let id = k.msg_id("n1", "S", 42, b"hello");
        assert!(id.starts_with("n1:S:42:"));
        assert_eq!(id.len(), "n1:S:42:".len() + 8);
        assert_eq!(k.verify("n1", "S", &id, b"hello"), Some(Ok(42)));
        assert_eq!(k.verify("n1", "S", &id, b"hellO"), Some(Err(42)));
        assert_eq!(k.verify("n1", "S", "n1:S:42", b"hello"), Some(Err(42)));
        assert_eq!(k.verify("n1", "T", &id, b"hello"), None);
        assert_eq!(k.verify("n2", "S", &id, b"hello"), None);
        let other = IdKey::from_bytes([8; 32]);
        assert_eq!(other.verify("n1", "S", &id, b"hello"), Some(Err(42)));
        // A tag for another sequence does not move.
        let tag = id.rsplit(':').next().unwrap();
        assert_eq!(
            k.verify("n1", "S", &format!("n1:S:43:{tag}"), b"hello"),
            Some(Err(43))
        );
        assert_eq!(b64url(&[0xfb, 0xff]), "-_8");
        assert_eq!(untagged_seq("n1", "S", "n1:S:42"), Some(42));
        assert_eq!(untagged_seq("n1", "S", &id), None);
        assert_eq!(untagged_seq("n1", "S", "n1:S:x"), None);
        assert_eq!(untagged_seq("n1", "S", "n2:S:42"), None);
        assert_ne!(content_digest("a.b", b"c"), content_digest("a.bc", b""));
    }

    #[test]
    fn the_key_file_is_made_once_and_kept() {
        let d = tempfile::tempdir().unwrap();
        let a = load_or_create(d.path()).unwrap();
        let b = load_or_create(d.path()).unwrap();
        assert_eq!(a, b);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(key_path(d.path()))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
            let meta = std::fs::metadata(key_path(d.path())).unwrap();
            assert_eq!(mode_warning(&key_path(d.path()), &meta), None);
            let loose = std::fs::Permissions::from_mode(0o640);
            std::fs::set_permissions(key_path(d.path()), loose).unwrap();
            let meta = std::fs::metadata(key_path(d.path())).unwrap();
            let w = mode_warning(&key_path(d.path()), &meta).unwrap();
            assert!(w.contains("mode 640") && w.contains("chmod 600"), "{w}");
        }
        std::fs::write(key_path(d.path()), "zz").unwrap();
        assert!(load_or_create(d.path()).unwrap_err().contains("damaged"));
    }
}
