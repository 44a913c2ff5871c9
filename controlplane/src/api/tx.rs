//! Account transactions: read, validate, then commit every change of a request in one
//! store transaction guarded by the account's lock key (optimistic concurrency: a
//! concurrent write of the same account makes the commit fail, and the request is re-run
//! from its reads).

use std::sync::Arc;

use serde::{Serialize, de::DeserializeOwned};
use vpc_store::{Compare, KeyValue, Op, Store, TxnOutcome};

use super::error::{ApiError, ApiResult};
use super::records::{lock_key, rec_key, rec_prefix};

/// Attempts before a request gives up with ABORTED.
pub const MAX_ATTEMPTS: usize = 16;

/// One attempt of a request's transaction.
#[derive(Debug)]
pub struct Tx {
    store: Arc<dyn Store>,
    account: String,
    compares: Vec<Compare>,
    ops: Vec<Op>,
}

impl Tx {
    /// Starts an attempt: reads the account's lock.
    pub async fn begin(store: &Arc<dyn Store>, account: &str) -> ApiResult<Tx> {
        let lock = lock_key(account);
        let compare = match store.get(&lock).await? {
            Some(kv) => Compare::ModRevision(lock, kv.mod_revision),
            None => Compare::Absent(lock),
        };
        Ok(Tx {
            store: Arc::clone(store),
            account: account.to_owned(),
            compares: vec![compare],
            ops: Vec::new(),
        })
    }

    /// The account.
    pub fn account(&self) -> &str {
        &self.account
    }

    /// The store (for reads outside the account).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// An object of the account, if it exists.
    pub async fn get<T: DeserializeOwned>(&self, kind: &str, id: &str) -> ApiResult<Option<T>> {
        match self.store.get(&rec_key(&self.account, kind, id)).await? {
            Some(kv) => Ok(Some(serde_json::from_slice(&kv.value)?)),
            None => Ok(None),
        }
    }

    /// An object the request names: NOT_FOUND (`what`, e.g. "VPC") when absent.
    pub async fn must<T: DeserializeOwned>(
        &self,
        kind: &str,
        what: &'static str,
        id: &str,
    ) -> ApiResult<T> {
        self.get(kind, id)
            .await?
            .ok_or_else(|| ApiError::not_found(what, id))
    }

    /// Every object of a kind (for validation that needs them all).
    pub async fn all<T: DeserializeOwned>(&self, kind: &str) -> ApiResult<Vec<T>> {
        let page = self
            .store
            .range(&rec_prefix(&self.account, kind), None, 0)
            .await?;
        page.kvs
            .iter()
            .map(|kv| serde_json::from_slice(&kv.value).map_err(ApiError::from))
            .collect()
    }

    /// Raw keys under a prefix (at most `limit`, 0: all).
    pub async fn keys(&self, prefix: &str, limit: usize) -> ApiResult<Vec<KeyValue>> {
        Ok(self.store.range(prefix, None, limit).await?.kvs)
    }

    /// Writes an object of the account.
    pub fn put<T: Serialize>(&mut self, kind: &str, id: &str, value: &T) -> ApiResult<()> {
        let bytes = serde_json::to_vec(value)?;
        self.ops
            .push(Op::Put(rec_key(&self.account, kind, id), bytes));
        Ok(())
    }

    /// Deletes an object of the account.
    pub fn delete(&mut self, kind: &str, id: &str) {
        self.ops.push(Op::Delete(rec_key(&self.account, kind, id)));
    }

    /// Writes a raw key.
    pub fn put_raw(&mut self, key: String, value: Vec<u8>) {
        self.ops.push(Op::Put(key, value));
    }

    /// Deletes a raw key.
    pub fn delete_raw(&mut self, key: String) {
        self.ops.push(Op::Delete(key));
    }

    /// The commit fails (and the request re-runs) if `key` exists by then.
    pub fn require_absent(&mut self, key: String) {
        self.compares.push(Compare::Absent(key));
    }

    /// Commits: `Some(revision)` when written (or nothing to write: the current revision),
    /// `None` on a conflict (re-run the request).
    pub async fn commit(mut self) -> ApiResult<Option<i64>> {
        if self.ops.is_empty() {
            return Ok(Some(self.store.revision().await?));
        }
        // Bump the lock: the next writer of this account must have read this state.
        let lock = lock_key(&self.account);
        self.ops.push(Op::Put(lock, Vec::new()));
        match self.store.txn(self.compares, self.ops).await? {
            TxnOutcome::Committed(rev) => Ok(Some(rev)),
            TxnOutcome::Conflict(_) => Ok(None),
        }
    }
}
