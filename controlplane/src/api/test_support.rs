//! Shared by the services' in-process tests: two accounts and an agent, an API over the
//! in-memory store, requests with a token, and the checks on answers.

use std::{fmt::Debug, sync::Arc};

use tonic::{Code, Request, Response, metadata::MetadataValue};
use tonic_types::StatusExt as _;

use super::{
    Api, Quotas,
    auth::{AccountCredentials, Auth, Credentials},
    server,
};

/// The first account.
pub const ACCT: &str = "111122223333";
/// Its token.
pub const TOKEN: &str = "tenant-a-token-0123456789";
/// The second account.
pub const OTHER: &str = "444455556666";
/// Its token.
pub const OTHER_TOKEN: &str = "tenant-b-token-0123456789";
/// An agent's token.
pub const AGENT: &str = "agent-token-0123456789abcdef";

/// An API over a fresh in-memory store, with both accounts and the agent.
pub async fn test_api(quotas: Quotas) -> Api {
    let auth = Auth::new(&Credentials {
        accounts: vec![
            AccountCredentials {
                id: ACCT.into(),
                tokens: vec![TOKEN.into()],
            },
            AccountCredentials {
                id: OTHER.into(),
                tokens: vec![OTHER_TOKEN.into()],
            },
        ],
        agent_tokens: vec![AGENT.into()],
    })
    .unwrap();
    server::api(Arc::new(vpc_store::mem::MemStore::new()), auth, quotas)
        .await
        .unwrap()
}

/// A request made with `token`.
pub fn req<T>(token: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {token}")).unwrap(),
    );
    r
}

/// The revision a write answered with.
pub fn revision<T>(r: &Response<T>) -> i64 {
    r.metadata()
        .get("x-vpc-revision")
        .expect("x-vpc-revision on a write")
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Asserts the code, and that the field is named (BadRequest violation for
/// INVALID_ARGUMENT, the message otherwise).
#[track_caller]
pub fn check<T: Debug>(case: &str, got: Result<T, tonic::Status>, code: Code, field: &str) {
    let e = match got {
        Ok(v) => panic!("{case}: expected {code:?}, got Ok({v:?})"),
        Err(e) => e,
    };
    assert_eq!(e.code(), code, "{case}: {e:?}");
    if code == Code::InvalidArgument {
        let bad = e
            .get_details_bad_request()
            .unwrap_or_else(|| panic!("{case}: no BadRequest in {e:?}"));
        let fields: Vec<&str> = bad
            .field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, vec![field], "{case}: {e:?}");
    } else {
        assert!(
            e.message().contains(field),
            "{case}: {:?} does not name {field:?}",
            e.message()
        );
    }
}
