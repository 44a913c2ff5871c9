//! Who is calling: bearer tokens naming an account, or an agent.
//!
//! The credentials file (JSON, `vpc-controlplane --credentials FILE`):
//! `{"accounts": [{"id": "111122223333", "tokens": ["..."]}], "agent_tokens": ["..."]}`.
//! Clients send `authorization: Bearer <token>`. An account token reaches only that
//! account's objects; an agent token reaches only the host service.

use std::{collections::HashMap, path::Path};

use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataMap;

use super::error::{ApiError, ApiResult};

/// A caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// A tenant: its account id.
    Account(String),
    /// A host agent.
    Agent,
}

/// The credentials file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// Accounts and their tokens.
    #[serde(default)]
    pub accounts: Vec<AccountCredentials>,
    /// Tokens of host agents.
    #[serde(default)]
    pub agent_tokens: Vec<String>,
}

/// One account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountCredentials {
    /// 12-digit account id.
    pub id: String,
    /// Its bearer tokens.
    pub tokens: Vec<String>,
}

/// Token -> principal.
#[derive(Clone, Debug, Default)]
pub struct Auth {
    tokens: HashMap<String, Principal>,
}

/// Why a credentials file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// Unreadable.
    #[error("reading {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Not JSON of the expected shape.
    #[error("parsing {path}: {source}")]
    Parse {
        /// File.
        path: String,
        /// Cause.
        source: serde_json::Error,
    },
    /// A semantic problem.
    #[error("{0}")]
    Invalid(String),
}

impl Auth {
    /// From credentials: account ids are 12 digits, tokens at least 16 characters and used once.
    pub fn new(creds: &Credentials) -> Result<Auth, CredentialsError> {
        let mut tokens = HashMap::new();
        let mut add = |t: &str, p: Principal| {
            if t.len() < 16 {
                return Err(CredentialsError::Invalid(format!(
                    "a token of {p:?} is shorter than 16 characters"
                )));
            }
            if tokens.insert(t.to_owned(), p).is_some() {
                return Err(CredentialsError::Invalid("a token is listed twice".into()));
            }
            Ok(())
        };
        for a in &creds.accounts {
            if a.id.len() != 12 || !a.id.bytes().all(|b| b.is_ascii_digit()) {
                return Err(CredentialsError::Invalid(format!(
                    "account id {:?} is not 12 digits",
                    a.id
                )));
            }
            for t in &a.tokens {
                add(t, Principal::Account(a.id.clone()))?;
            }
        }
        for t in &creds.agent_tokens {
            add(t, Principal::Agent)?;
        }
        Ok(Auth { tokens })
    }

    /// Reads a credentials file.
    pub fn load(path: &Path) -> Result<Auth, CredentialsError> {
        let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let creds: Credentials =
            serde_json::from_str(&text).map_err(|source| CredentialsError::Parse {
                path: path.display().to_string(),
                source,
            })?;
        Auth::new(&creds)
    }

    /// The caller of a request.
    pub fn principal(&self, md: &MetadataMap) -> ApiResult<Principal> {
        let value = md.get("authorization").ok_or_else(|| {
            ApiError::Unauthenticated(
                "no credentials: send `authorization: Bearer <token>` (the CLI reads VPC_TOKEN)"
                    .into(),
            )
        })?;
        let text = value
            .to_str()
            .map_err(|_| ApiError::Unauthenticated("malformed authorization header".into()))?;
        let token = text.strip_prefix("Bearer ").ok_or_else(|| {
            ApiError::Unauthenticated("authorization must be `Bearer <token>`".into())
        })?;
        self.tokens
            .get(token.trim())
            .cloned()
            .ok_or_else(|| ApiError::Unauthenticated("unknown token".into()))
    }

    /// The calling account (agents have none).
    pub fn account(&self, md: &MetadataMap) -> ApiResult<String> {
        match self.principal(md)? {
            Principal::Account(a) => Ok(a),
            Principal::Agent => Err(ApiError::Unauthenticated(
                "an agent token cannot manage tenant objects".into(),
            )),
        }
    }

    /// Requires an agent.
    pub fn agent(&self, md: &MetadataMap) -> ApiResult<()> {
        match self.principal(md)? {
            Principal::Agent => Ok(()),
            Principal::Account(_) => Err(ApiError::Unauthenticated(
                "the host service needs an agent token".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataValue;

    fn md(v: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", MetadataValue::try_from(v).unwrap());
        m
    }

    #[test]
    fn tokens_map_to_principals() {
        let auth = Auth::new(&Credentials {
            accounts: vec![AccountCredentials {
                id: "111122223333".into(),
                tokens: vec!["tenant-token-0123456789".into()],
            }],
            agent_tokens: vec!["agent-token-0123456789".into()],
        })
        .unwrap();
        assert_eq!(
            auth.account(&md("Bearer tenant-token-0123456789")).unwrap(),
            "111122223333"
        );
        assert!(auth.agent(&md("Bearer agent-token-0123456789")).is_ok());
        assert!(auth.account(&md("Bearer agent-token-0123456789")).is_err());
        assert!(auth.agent(&md("Bearer tenant-token-0123456789")).is_err());
        let e = auth.account(&md("Bearer nope-nope-nope-nope")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(auth.account(&MetadataMap::new()).is_err());
        assert!(auth.account(&md("Basic abc")).is_err());
    }

    #[test]
    fn bad_credentials_are_refused() {
        let short = Credentials {
            accounts: vec![AccountCredentials {
                id: "111122223333".into(),
                tokens: vec!["short".into()],
            }],
            agent_tokens: vec![],
        };
        assert!(Auth::new(&short).is_err());
        let bad_id = Credentials {
            accounts: vec![AccountCredentials {
                id: "12".into(),
                tokens: vec![],
            }],
            agent_tokens: vec![],
        };
        assert!(Auth::new(&bad_id).is_err());
    }
}
