//! The API's errors and their gRPC status codes.
//!
//! Every error names what a person needs to act on: the field (as a google.rpc.BadRequest
//! field violation, so clients can point at it), the object, the limit.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

/// Why a request failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApiError {
    /// A field is invalid (INVALID_ARGUMENT with a field violation).
    #[error("{field}: {message}")]
    Invalid {
        /// The request field, e.g. `cidr_block` or `rules[2].from_port`.
        field: String,
        /// What is wrong and what is expected.
        message: String,
    },
    /// An object named in the request does not exist for the caller (NOT_FOUND).
    #[error("{kind} {id} does not exist")]
    NotFound {
        /// Object kind (`VPC`, `subnet`, ...).
        kind: &'static str,
        /// The id as given.
        id: String,
    },
    /// The object exists already, or a client token was reused with other parameters
    /// (ALREADY_EXISTS).
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is valid but the objects' state refuses it, e.g. deleting a VPC that has
    /// subnets (FAILED_PRECONDITION).
    #[error("{0}")]
    Precondition(String),
    /// A quota or a pool (addresses, VNIs) is exhausted (RESOURCE_EXHAUSTED).
    #[error("{0}")]
    Exhausted(String),
    /// No or an unknown token (UNAUTHENTICATED).
    #[error("{0}")]
    Unauthenticated(String),
    /// The store cannot be reached (UNAVAILABLE: retry).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Concurrent writes kept conflicting (ABORTED: retry).
    #[error("too many concurrent changes to this account; retry")]
    Aborted,
    /// A bug or a broken store (INTERNAL).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// INVALID_ARGUMENT on `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// NOT_FOUND.
    pub fn not_found(kind: &'static str, id: impl Into<String>) -> Self {
        ApiError::NotFound {
            kind,
            id: id.into(),
        }
    }

    /// The gRPC code.
    pub fn code(&self) -> Code {
        match self {
            ApiError::Invalid { .. } => Code::InvalidArgument,
            ApiError::NotFound { .. } => Code::NotFound,
            ApiError::AlreadyExists(_) => Code::AlreadyExists,
            ApiError::Precondition(_) => Code::FailedPrecondition,
            ApiError::Exhausted(_) => Code::ResourceExhausted,
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::Aborted => Code::Aborted,
            ApiError::Internal(_) => Code::Internal,
        }
    }

    /// The same error for an element of a repeated field (`rules` -> `rules[2].from_port`).
    pub fn within(self, parent: &str, index: usize) -> Self {
        match self {
            ApiError::Invalid { field, message } => ApiError::Invalid {
                field: format!("{parent}[{index}].{field}"),
                message,
            },
            other => other,
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let code = e.code();
        let message = e.to_string();
        match &e {
            ApiError::Invalid { field, message: m } => Status::with_error_details(
                code,
                message,
                ErrorDetails::with_bad_request_violation(field.clone(), m.clone()),
            ),
            _ => Status::new(code, message),
        }
    }
}

impl From<vpc_store::StoreError> for ApiError {
    fn from(e: vpc_store::StoreError) -> Self {
        match e {
            vpc_store::StoreError::Unavailable(m) => ApiError::Unavailable(m),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<serde_json::Error> for ApiError {
    fn from(e: serde_json::Error) -> Self {
        ApiError::Internal(format!("stored record: {e}"))
    }
}

/// Result of an API operation.
pub type ApiResult<T> = Result<T, ApiError>;
