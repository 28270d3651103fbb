//! `--claude-auth`: the guest gets a copy of the user's Claude Code login, never
//! the host's `~/.claude`.
//!
//! Before the boot, [`prepare`] fills two directories of aivmm's state that the
//! guest may write:
//! - the workdir's `<state>/claude`, which is the guest's `~/.claude` (its
//!   settings, commands, plugins and history stay there, for this workdir only).
//!   It gets a copy of the host's `~/.claude/.credentials.json` when the host's
//!   token is the newer one (a larger `claudeAiOauth.expiresAt`) or the copy is
//!   missing or unreadable. Nothing else of the host's `~/.claude` goes in.
//! - `<state root>/../claude/.claude.json`, which the guest's `~/.claude.json`
//!   links to: when the host's `~/.claude.json` is newer, it is replaced by the
//!   host file's [`AUTH_KEYS`] only (the account, an API key and its approval,
//!   the onboarding flag), not its projects, MCP servers or tool approvals.
//!
//! When the VM stops, [`ClaudeFiles::write_back`] reads the guest's
//! `.credentials.json` (no symlink followed, at most [`MAX_CREDENTIALS`] bytes),
//! keeps only a well-formed `claudeAiOauth` object (see [`oauth`]), and if its
//! `expiresAt` is later than the host's, writes it into the host's
//! `~/.claude/.credentials.json` (temp file, fsync, rename; 0600), keeping the
//! host file's other fields. A guest that swaps in another account's token
//! could still log the host in as that account; only a refresh of a login the
//! host already has is written back (no host login, no write).

use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// The largest credentials file aivmm reads (the real one is under 1 KiB).
pub const MAX_CREDENTIALS: u64 = 64 << 10;
/// The largest host `~/.claude.json` aivmm reads (it holds project history).
const MAX_CONFIG: u64 = 64 << 20;
/// The fields of `~/.claude.json` the guest gets: who is logged in, an API key
/// and the user's answer to using it, and whether onboarding is done.
pub const AUTH_KEYS: &[&str] = &[
    "oauthAccount",
    "primaryApiKey",
    "customApiKeyResponses",
    "userID",
    "hasCompletedOnboarding",
];
/// The credentials file, in `~/.claude` on the host and in the guest.
const CREDENTIALS: &str = ".credentials.json";
/// The longest token string taken from the guest.
const MAX_TOKEN: usize = 8192;

/// Why `--claude-auth` cannot prepare or hand back the login.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `HOME` is not set, so the user's Claude files cannot be found.
    #[error("HOME is not set")]
    NoHome,
    /// A file could not be read or written.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
}

/// `Result` of this module.
pub type Result<T> = std::result::Result<T, Error>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The host side of `--claude-auth` for one run.
#[derive(Debug, Clone)]
pub struct ClaudeFiles {
    /// The workdir's copy, shared as the guest's `~/.claude`.
    pub dir: PathBuf,
    /// `<state root>/../claude`, holding the guest's `.claude.json`.
    pub state: PathBuf,
    /// The host's `~/.claude` (never shared; only its credentials file is read
    /// and, on a refresh, rewritten).
    pub host_dir: PathBuf,
}

/// What [`ClaudeFiles::write_back`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum WriteBack {
    /// The host has no login of its own to refresh (no regular credentials
    /// file with a `claudeAiOauth` token): nothing is written.
    NoHostLogin,
    /// The guest's file was not a valid credentials file (the reason).
    Rejected(String),
    /// The guest's token is not newer than the host's.
    NotNewer,
    /// The host's credentials now hold the guest's refreshed token.
    Written,
}

/// Reads at most `max` bytes of regular file `path`; `None` if it is missing.
/// With `follow == false` a symlink is refused (`O_NOFOLLOW`), and a FIFO or
/// device the guest planted is refused without blocking.
fn read_bounded(path: &Path, max: u64, follow: bool) -> io::Result<Option<Vec<u8>>> {
    let mut flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    if !follow {
        flags |= libc::O_NOFOLLOW;
    }
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let md = f.metadata()?;
    if !md.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    if md.size() > max {
        return Err(io::Error::other(format!("larger than {max} bytes")));
    }
    let mut buf = Vec::new();
    f.take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(io::Error::other(format!("larger than {max} bytes")));
    }
    Ok(Some(buf))
}

/// `claudeAiOauth.expiresAt` of a credentials file's bytes.
fn expires_at(bytes: &[u8]) -> Option<u64> {
    let v: Value = serde_json::from_slice(bytes).ok()?;
    v.get("claudeAiOauth")?.get("expiresAt")?.as_u64()
}

/// The `claudeAiOauth` object of credentials `v`, rebuilt from its known
/// fields only, or why there is none: `accessToken` and `refreshToken`
/// (printable ASCII, at most [`MAX_TOKEN`]), `expiresAt` (milliseconds),
/// `scopes` (short strings), and optional `subscriptionType` and
/// `rateLimitTier` (short strings or null). Other fields are dropped.
pub fn oauth(v: &Value) -> std::result::Result<Map<String, Value>, String> {
    let o = v
        .get("claudeAiOauth")
        .and_then(Value::as_object)
        .ok_or("no claudeAiOauth object")?;
    let mut out = Map::new();
    for key in ["accessToken", "refreshToken"] {
        let t = o.get(key).and_then(Value::as_str).ok_or(format!("no string {key}"))?;
        if t.is_empty() || t.len() > MAX_TOKEN || !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("{key} is not a token"));
        }
        out.insert(key.into(), Value::from(t));
    }
    let exp = o
        .get("expiresAt")
        .and_then(Value::as_u64)
        .ok_or("no numeric expiresAt")?;
    out.insert("expiresAt".into(), Value::from(exp));
    let short = |s: &str| s.len() <= 256 && !s.chars().any(char::is_control);
    let scopes = o
        .get("scopes")
        .and_then(Value::as_array)
        .ok_or("no scopes array")?;
    if scopes.len() > 64 || !scopes.iter().all(|s| s.as_str().is_some_and(short)) {
        return Err("scopes is not a short list of strings".into());
    }
    out.insert("scopes".into(), Value::from(scopes.clone()));
    for key in ["subscriptionType", "rateLimitTier"] {
        match o.get(key) {
            None => {}
            Some(Value::Null) => {
                out.insert(key.into(), Value::Null);
            }
            Some(Value::String(s)) if short(s) => {
                out.insert(key.into(), Value::from(s.as_str()));
            }
            Some(_) => return Err(format!("{key} is not a short string")),
        }
    }
    Ok(out)
}

/// The [`AUTH_KEYS`] of a `~/.claude.json`'s bytes, as a JSON object with a
/// newline (`{}` if the file is not a JSON object).
pub fn auth_fields(bytes: &[u8]) -> Vec<u8> {
    let mut out = Map::new();
    if let Ok(Value::Object(all)) = serde_json::from_slice::<Value>(bytes) {
        for key in AUTH_KEYS {
            if let Some(v) = all.get(*key) {
                out.insert((*key).into(), v.clone());
            }
        }
    }
    let mut text = Value::Object(out).to_string().into_bytes();
    text.push(b'\n');
    text
}

/// Replaces `dir/name` (a directory the guest writes) with `bytes`: whatever
/// stands under the temporary name is unlinked, the new file is created
/// exclusively (0600, no symlink followed) and renamed over the old name, so a
/// symlink there is replaced, never written through.
fn replace_in_guest_dir(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!("{name}.new"));
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&tmp)(e)),
        _ => {}
    }
    let mut out = crate::state_fs::options()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    out.write_all(bytes).map_err(io_err(&tmp))?;
    drop(out);
    let dest = dir.join(name);
    std::fs::rename(&tmp, &dest).map_err(io_err(&dest))
}

/// Writes `bytes` to host file `path` atomically ([`crate::state_fs::write_atomic`]).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::state_fs::write_atomic(path, bytes).map_err(io_err(path))
}

/// Prepares `--claude-auth` for host home `home`, aivmm's state root
/// `state_root` and the workdir's state directory `state_dir` (see the module
/// docs). The host's `~/.claude` is only read.
pub fn prepare(home: &Path, state_root: &Path, state_dir: &Path) -> Result<ClaudeFiles> {
    let host_dir = home.join(".claude");
    let dir = state_dir.join("claude");
    crate::state_fs::dir(&dir).map_err(io_err(&dir))?;
    let host_creds = host_dir.join(CREDENTIALS);
    if let Some(host) = read_bounded(&host_creds, MAX_CREDENTIALS, true).map_err(io_err(&host_creds))? {
        // The copy is the guest's: unreadable counts as none.
        let copy = read_bounded(&dir.join(CREDENTIALS), MAX_CREDENTIALS, false)
            .ok()
            .flatten();
        let copy_exp = copy.as_deref().and_then(expires_at);
        if copy_exp.is_none() || expires_at(&host) > copy_exp {
            replace_in_guest_dir(&dir, CREDENTIALS, &host)?;
        }
    }

    let state = state_root.parent().unwrap_or(state_root).join("claude");
    crate::state_fs::dir(&state).map_err(io_err(&state))?;
    let host_json = home.join(".claude.json");
    let copy = state.join(".claude.json");
    // A symlink standing for the copy counts as no copy, and is replaced.
    let host_mtime = std::fs::metadata(&host_json).and_then(|m| m.modified()).ok();
    let copy_mtime = std::fs::symlink_metadata(&copy)
        .ok()
        .filter(std::fs::Metadata::is_file)
        .and_then(|m| m.modified().ok());
    match (host_mtime, copy_mtime) {
        (Some(h), c) if c.is_none_or(|c| h > c) => {
            let bytes = read_bounded(&host_json, MAX_CONFIG, true)
                .map_err(io_err(&host_json))?
                .unwrap_or_default();
            replace_in_guest_dir(&state, ".claude.json", &auth_fields(&bytes))?;
        }
        // Claude Code starts from an empty object.
        (None, None) => replace_in_guest_dir(&state, ".claude.json", b"{}\n")?,
        _ => {}
    }
    Ok(ClaudeFiles {
        dir,
        state,
        host_dir,
    })
}

impl ClaudeFiles {
    /// Hands a token the guest refreshed back to the host (see the module docs).
    /// Errors are the host side's only; whatever the guest left is an outcome.
    pub fn write_back(&self) -> Result<WriteBack> {
        let host_path = self.host_dir.join(CREDENTIALS);
        match std::fs::symlink_metadata(&host_path) {
            Ok(m) if m.is_file() => {}
            _ => return Ok(WriteBack::NoHostLogin),
        }
        let host_bytes = read_bounded(&host_path, MAX_CREDENTIALS, false)
            .map_err(io_err(&host_path))?
            .unwrap_or_default();
        let Ok(Value::Object(mut host)) = serde_json::from_slice::<Value>(&host_bytes) else {
            return Ok(WriteBack::NoHostLogin);
        };
        let Some(host_exp) = expires_at(&host_bytes) else {
            return Ok(WriteBack::NoHostLogin);
        };
        let guest_path = self.dir.join(CREDENTIALS);
        let guest = match read_bounded(&guest_path, MAX_CREDENTIALS, false) {
            Ok(Some(b)) => b,
            Ok(None) => return Ok(WriteBack::Rejected("no credentials file".into())),
            Err(e) => return Ok(WriteBack::Rejected(e.to_string())),
        };
        let v: Value = match serde_json::from_slice(&guest) {
            Ok(v) => v,
            Err(e) => return Ok(WriteBack::Rejected(format!("not JSON: {e}"))),
        };
        let token = match oauth(&v) {
            Ok(t) => t,
            Err(why) => return Ok(WriteBack::Rejected(why)),
        };
        if token.get("expiresAt").and_then(Value::as_u64) <= Some(host_exp) {
            return Ok(WriteBack::NotNewer);
        }
        host.insert("claudeAiOauth".into(), Value::Object(token));
        write_atomic(&host_path, Value::Object(host).to_string().as_bytes())?;
        Ok(WriteBack::Written)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const HOST_CREDS: &str = r#"{"claudeAiOauth":{"accessToken":"sk-old","refreshToken":"rt-old","expiresAt":1000,"scopes":["user:inference"],"subscriptionType":"max"},"mcpOAuth":{"k":"v"}}"#;

    fn refreshed(exp: u64) -> String {
        format!(
            r#"{{"claudeAiOauth":{{"accessToken":"sk-new","refreshToken":"rt-new","expiresAt":{exp},"scopes":["user:inference"],"subscriptionType":"max","extra":"x"}},"evil":1}}"#
        )
    }

    /// A host home with a login, settings and a config; returns (home, state
    /// root, workdir state, files).
    fn setup() -> (tempfile::TempDir, tempfile::TempDir, ClaudeFiles) {
        let home = tempfile::tempdir().unwrap();
        let st = tempfile::tempdir().unwrap();
        let c = home.path().join(".claude");
        std::fs::create_dir_all(&c).unwrap();
        std::fs::write(c.join(CREDENTIALS), HOST_CREDS).unwrap();
        std::fs::set_permissions(c.join(CREDENTIALS), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(c.join("settings.json"), "{\"theme\":\"dark\"}").unwrap();
        std::fs::write(
            home.path().join(".claude.json"),
            r#"{"oauthAccount":{"emailAddress":"a@b"},"userID":"u1","mcpServers":{"x":{"command":"evil"}},"projects":{"/p":{}}}"#,
        )
        .unwrap();
        let files = prepare(home.path(), &st.path().join("aivmm/vms"), &st.path().join("aivmm/vms/w")).unwrap();
        (home, st, files)
    }

    /// Every file under `dir` with its bytes, sorted (symlinks as their target).
    fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                out.extend(tree(&p));
            } else if m.file_type().is_symlink() {
                out.push((p.clone(), std::fs::read_link(&p).unwrap().into_os_string().into_encoded_bytes()));
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn the_copy_holds_only_the_credentials_and_auth_fields() {
        let (home, _st, f) = setup();
        let names: Vec<_> = std::fs::read_dir(&f.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [CREDENTIALS]);
        assert_eq!(std::fs::read_to_string(f.dir.join(CREDENTIALS)).unwrap(), HOST_CREDS);
        let mode = std::fs::metadata(f.dir.join(CREDENTIALS)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&f.dir).unwrap().permissions().mode() & 0o777, 0o700);
        let json = std::fs::read_to_string(f.state.join(".claude.json")).unwrap();
        assert_eq!(json, "{\"oauthAccount\":{\"emailAddress\":\"a@b\"},\"userID\":\"u1\"}\n");
        assert_eq!(f.host_dir, home.path().join(".claude"));
        // A host that is not logged in gives no credentials; a bad config, `{}`.
        let bare = tempfile::tempdir().unwrap();
        std::fs::write(bare.path().join(".claude.json"), "not json").unwrap();
        let st = tempfile::tempdir().unwrap();
        let g = prepare(bare.path(), &st.path().join("vms"), &st.path().join("vms/w")).unwrap();
        assert_eq!(std::fs::read_dir(&g.dir).unwrap().count(), 0);
        assert_eq!(std::fs::read_to_string(g.state.join(".claude.json")).unwrap(), "{}\n");
        assert!(!bare.path().join(".claude").exists(), "the host's ~/.claude is not made");
    }

    #[test]
    fn the_newer_token_wins_on_the_way_in() {
        let (home, st, f) = setup();
        let copy = f.dir.join(CREDENTIALS);
        // The guest's refreshed token stays while the host's is older.
        std::fs::write(&copy, refreshed(2000)).unwrap();
        prepare(home.path(), &st.path().join("aivmm/vms"), &st.path().join("aivmm/vms/w")).unwrap();
        assert_eq!(std::fs::read_to_string(&copy).unwrap(), refreshed(2000));
        // A newer host login (or garbage in the copy) replaces it.
        std::fs::write(&copy, "garbage").unwrap();
        prepare(home.path(), &st.path().join("aivmm/vms"), &st.path().join("aivmm/vms/w")).unwrap();
        assert_eq!(std::fs::read_to_string(&copy).unwrap(), HOST_CREDS);
        // A symlink planted for the copy is replaced, not written through.
        let victim = home.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::fs::remove_file(&copy).unwrap();
        std::os::unix::fs::symlink(&victim, &copy).unwrap();
        std::os::unix::fs::symlink(&victim, f.dir.join(".credentials.json.new")).unwrap();
        prepare(home.path(), &st.path().join("aivmm/vms"), &st.path().join("aivmm/vms/w")).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert!(std::fs::symlink_metadata(&copy).unwrap().is_file());
    }

    #[test]
    fn a_hostile_guest_copy_never_reaches_the_host() {
        let (home, _st, f) = setup();
        let before = tree(&f.host_dir);
        // Hooks, commands and plugins stay in the guest's own ~/.claude.
        std::fs::write(
            f.dir.join("settings.json"),
            r#"{"hooks":{"SessionStart":[{"hooks":[{"type":"command","command":"touch /tmp/pwned"}]}]}}"#,
        )
        .unwrap();
        std::fs::create_dir_all(f.dir.join("commands")).unwrap();
        std::fs::write(f.dir.join("commands/x.md"), "run evil").unwrap();
        let copy = f.dir.join(CREDENTIALS);
        let big = format!(
            r#"{{"claudeAiOauth":{{"accessToken":"{}","refreshToken":"r","expiresAt":9000,"scopes":[]}}}}"#,
            "a".repeat(MAX_CREDENTIALS as usize)
        );
        let secret = home.path().join("secret");
        std::fs::write(&secret, refreshed(9000)).unwrap();
        let bad: Vec<(&str, String)> = vec![
            ("oversized", big),
            ("malformed", "{\"claudeAiOauth\":".into()),
            ("no object", "[1,2]".into()),
            ("token not a string", r#"{"claudeAiOauth":{"accessToken":1,"refreshToken":"r","expiresAt":9000,"scopes":[]}}"#.into()),
            ("newline in token", r#"{"claudeAiOauth":{"accessToken":"a\nb","refreshToken":"r","expiresAt":9000,"scopes":[]}}"#.into()),
            ("expiresAt a string", r#"{"claudeAiOauth":{"accessToken":"a","refreshToken":"r","expiresAt":"9000","scopes":[]}}"#.into()),
            ("no scopes", r#"{"claudeAiOauth":{"accessToken":"a","refreshToken":"r","expiresAt":9000}}"#.into()),
            ("scopes of numbers", r#"{"claudeAiOauth":{"accessToken":"a","refreshToken":"r","expiresAt":9000,"scopes":[1]}}"#.into()),
        ];
        for (what, text) in bad {
            std::fs::write(&copy, text).unwrap();
            let r = f.write_back().unwrap();
            assert!(matches!(r, WriteBack::Rejected(_)), "{what}: {r:?}");
        }
        // A symlink to a valid file, and a FIFO, are refused without following.
        std::fs::remove_file(&copy).unwrap();
        std::os::unix::fs::symlink(&secret, &copy).unwrap();
        assert!(matches!(f.write_back().unwrap(), WriteBack::Rejected(_)));
        std::fs::remove_file(&copy).unwrap();
        let c = std::ffi::CString::new(copy.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(f.write_back().unwrap(), WriteBack::Rejected(_)));
        std::fs::remove_file(&copy).unwrap();
        // An older or equal token is not written back.
        std::fs::write(&copy, refreshed(1000)).unwrap();
        assert_eq!(f.write_back().unwrap(), WriteBack::NotNewer);
        assert_eq!(tree(&f.host_dir), before, "the host's ~/.claude is unchanged");
        assert!(!home.path().join("pwned").exists());
    }

    #[test]
    fn a_refreshed_token_reaches_the_host_atomically() {
        let (home, _st, f) = setup();
        let host = f.host_dir.join(CREDENTIALS);
        std::fs::write(f.dir.join(CREDENTIALS), refreshed(5000)).unwrap();
        assert_eq!(f.write_back().unwrap(), WriteBack::Written);
        let v: Value = serde_json::from_slice(&std::fs::read(&host).unwrap()).unwrap();
        let o = &v["claudeAiOauth"];
        assert_eq!(o["accessToken"], "sk-new");
        assert_eq!(o["refreshToken"], "rt-new");
        assert_eq!(o["expiresAt"], 5000);
        assert_eq!(o["subscriptionType"], "max");
        assert!(o.get("extra").is_none() && v.get("evil").is_none(), "{v}");
        assert_eq!(v["mcpOAuth"]["k"], "v", "the host's other fields are kept");
        assert_eq!(std::fs::metadata(&host).unwrap().permissions().mode() & 0o777, 0o600);
        // No temp file is left; settings untouched.
        let names: Vec<_> = std::fs::read_dir(&f.host_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(
            std::fs::read_to_string(f.host_dir.join("settings.json")).unwrap(),
            "{\"theme\":\"dark\"}"
        );
        // Once written, the same token is not newer.
        assert_eq!(f.write_back().unwrap(), WriteBack::NotNewer);
        // A host with no login gets none from the guest.
        std::fs::remove_file(&host).unwrap();
        assert_eq!(f.write_back().unwrap(), WriteBack::NoHostLogin);
        assert!(!host.exists());
        drop(home);
    }
}
