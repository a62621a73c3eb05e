//! Who is asking: client certificates (user = CN, groups = O, as
//! kube-apiserver reads them), static bearer tokens, and bootstrap tokens
//! (kubeadm's: `<id>.<secret>` checked against the Secret
//! `kube-system/bootstrap-token-<id>`). Anything else is anonymous, and
//! anonymous requests are refused.

use std::{collections::HashMap, path::Path};

use axum::http::{HeaderMap, header::AUTHORIZATION};

/// An authenticated identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
}

/// Every authenticated user is in this group (RBAC grants discovery to it).
pub const AUTHENTICATED: &str = "system:authenticated";

impl User {
    fn new(name: String, mut groups: Vec<String>) -> Self {
        if !groups.iter().any(|g| g == AUTHENTICATED) {
            groups.push(AUTHENTICATED.to_owned());
        }
        Self { name, groups }
    }

    pub fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }
}

/// The identity in a verified client certificate, if it names one.
pub fn user_from_certificate(der: &[u8]) -> Option<User> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let name = subject.iter_common_name().next()?.as_str().ok()?.to_owned();
    let groups = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_owned))
        .collect();
    Some(User::new(name, groups))
}

/// The group every bootstrap token's user is in.
pub const BOOTSTRAPPERS: &str = "system:bootstrappers";

/// The request's bearer token if it has a bootstrap token's shape:
/// (id, secret), 6 and 16 characters of `[a-z0-9]`.
pub fn bootstrap_token(headers: &HeaderMap) -> Option<(String, String)> {
    let header = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (id, secret) = header.strip_prefix("Bearer ")?.trim().split_once('.')?;
    let valid = |part: &str, length: usize| {
        part.len() == length
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    (valid(id, 6) && valid(secret, 16)).then(|| (id.to_owned(), secret.to_owned()))
}

/// The user a bootstrap token authenticates as, given its Secret (as
/// the API serves it): the type, id and secret must match, the token be
/// meant for authentication, unexpired and not being deleted.
pub fn bootstrap_user(
    secret: &serde_json::Value,
    id: &str,
    token_secret: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<User> {
    use base64::Engine as _;
    let field = |name: &str| -> Option<String> {
        let encoded = secret["data"][name].as_str()?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok()?;
        String::from_utf8(bytes).ok()
    };
    if secret["type"] != "bootstrap.kubernetes.io/token"
        || !secret["metadata"]["deletionTimestamp"].is_null()
        || field("token-id")? != id
        || field("usage-bootstrap-authentication").as_deref() != Some("true")
    {
        return None;
    }
    // Compared in constant time: the secret is the credential.
    let stored = field("token-secret")?;
    if stored.len() != token_secret.len()
        || stored
            .bytes()
            .zip(token_secret.bytes())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            != 0
    {
        return None;
    }
    if let Some(expiration) = field("expiration") {
        let expires = chrono::DateTime::parse_from_rfc3339(&expiration).ok()?;
        if expires <= now {
            return None;
        }
    }
    let mut groups = vec![BOOTSTRAPPERS.to_owned()];
    for extra in field("auth-extra-groups").unwrap_or_default().split(',') {
        let extra = extra.trim();
        if extra.is_empty() {
            continue;
        }
        // Only groups of the bootstrappers' own family (as upstream).
        if !extra.starts_with("system:bootstrappers:") {
            return None;
        }
        groups.push(extra.to_owned());
    }
    Some(User::new(format!("system:bootstrap:{id}"), groups))
}

/// Why the token file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: expected token,user,uid[,\"group1,group2\"]")]
    Malformed { path: String, line: usize },
}

/// Authenticates requests.
#[derive(Debug, Default)]
pub struct Authenticator {
    tokens: HashMap<String, User>,
}

impl Authenticator {
    /// Reads kube-apiserver's static token file format: CSV lines of
    /// `token,user,uid[,"group1,group2"]`.
    pub fn with_token_file(path: &Path) -> Result<Self, TokenFileError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: shown.clone(),
            source,
        })?;
        let mut tokens = HashMap::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let malformed = || TokenFileError::Malformed {
                path: shown.clone(),
                line: number + 1,
            };
            let mut fields = line.splitn(4, ',');
            let token = fields
                .next()
                .filter(|t| !t.is_empty())
                .ok_or_else(malformed)?;
            let user = fields
                .next()
                .filter(|u| !u.is_empty())
                .ok_or_else(malformed)?;
            fields.next().ok_or_else(malformed)?;
            let groups = fields
                .next()
                .map(|g| {
                    g.trim_matches('"')
                        .split(',')
                        .map(str::trim)
                        .filter(|g| !g.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            tokens.insert(token.to_owned(), User::new(user.to_owned(), groups));
        }
        Ok(Self { tokens })
    }

    /// The request's user: its client certificate first, then its bearer
    /// token. `None` is anonymous.
    pub fn authenticate(&self, certificate: Option<&User>, headers: &HeaderMap) -> Option<User> {
        if let Some(user) = certificate {
            return Some(user.clone());
        }
        let header = headers.get(AUTHORIZATION)?.to_str().ok()?;
        let token = header.strip_prefix("Bearer ")?.trim();
        self.tokens.get(token).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_tokens_authenticate_while_valid() {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let secret = |expiration: &str| {
            serde_json::json!({
                "type": "bootstrap.kubernetes.io/token",
                "metadata": {"name": "bootstrap-token-abcdef"},
                "data": {
                    "token-id": b64("abcdef"),
                    "token-secret": b64("0123456789abcdef"),
                    "usage-bootstrap-authentication": b64("true"),
                    "expiration": b64(expiration),
                    "auth-extra-groups": b64("system:bootstrappers:wharf:default-node-token"),
                }
            })
        };
        let now = chrono::Utc::now();
        let later = (now + chrono::Duration::hours(1)).to_rfc3339();
        let user = bootstrap_user(&secret(&later), "abcdef", "0123456789abcdef", now).unwrap();
        assert_eq!(user.name, "system:bootstrap:abcdef");
        assert!(user.in_group(BOOTSTRAPPERS));
        assert!(user.in_group("system:bootstrappers:wharf:default-node-token"));
        assert!(bootstrap_user(&secret(&later), "abcdef", "0123456789abcdeX", now).is_none());
        let earlier = (now - chrono::Duration::hours(1)).to_rfc3339();
        assert!(bootstrap_user(&secret(&earlier), "abcdef", "0123456789abcdef", now).is_none());
        let mut headers = HeaderMap::new();
        headers.insert(
            AUTHORIZATION,
            "Bearer abcdef.0123456789abcdef".parse().unwrap(),
        );
        assert_eq!(
            bootstrap_token(&headers),
            Some(("abcdef".into(), "0123456789abcdef".into()))
        );
        headers.insert(
            AUTHORIZATION,
            "Bearer not-a-bootstrap-token".parse().unwrap(),
        );
        assert_eq!(bootstrap_token(&headers), None);
    }

    #[test]
    fn tokens_map_to_users_and_groups() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.csv");
        std::fs::write(
            &path,
            "# comment\nsecret1,alice,1001,\"dev,ops\"\nsecret2,bob,1002\n",
        )
        .unwrap();
        let authn = Authenticator::with_token_file(&path).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, "Bearer secret1".parse().unwrap());
        let alice = authn.authenticate(None, &headers).unwrap();
        assert_eq!(alice.name, "alice");
        assert_eq!(alice.groups, ["dev", "ops", AUTHENTICATED]);
        headers.insert(AUTHORIZATION, "Bearer wrong".parse().unwrap());
        assert_eq!(authn.authenticate(None, &headers), None);
        assert_eq!(authn.authenticate(None, &HeaderMap::new()), None);
        std::fs::write(&path, "onlytoken\n").unwrap();
        assert!(matches!(
            Authenticator::with_token_file(&path),
            Err(TokenFileError::Malformed { line: 1, .. })
        ));
    }
}
