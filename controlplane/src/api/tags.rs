//! `TagService`: tags of any object, updated in place (one transaction for every object of
//! the request).

use tonic::{Request, Response, Status};
use vpc_proto::v1::{self as pb, tag_service_server::TagService};

use super::error::{ApiError, ApiResult};
use super::records::kind;
use super::{Api, respond, validate};

/// Kinds that carry tags (their id prefixes) and their names in errors.
const TAGGABLE: &[(&str, &str)] = &[
    (kind::VPC, "VPC"),
    (kind::SUBNET, "subnet"),
    (kind::SG, "security group"),
    (kind::ACL, "network ACL"),
    (kind::LB, "load balancer"),
    (kind::TG, "target group"),
    (kind::INSTANCE, "instance"),
    (kind::VOLUME, "volume"),
    (kind::SNAPSHOT, "snapshot"),
];

/// The service.
#[derive(Clone, Debug)]
pub struct Tags {
    api: Api,
}

impl Tags {
    /// Over the shared API state.
    pub fn new(api: Api) -> Self {
        Tags { api }
    }

    async fn change(
        &self,
        account: String,
        ids: &[String],
        tags: &[pb::Tag],
        delete: bool,
    ) -> ApiResult<i64> {
        if ids.is_empty() {
            return Err(ApiError::invalid("resource_ids", "at least one id"));
        }
        let mut targets = Vec::with_capacity(ids.len());
        for (i, id) in ids.iter().enumerate() {
            let field = format!("resource_ids[{i}]");
            let prefix = id.rsplit_once('-').map_or("", |(p, _)| p);
            let Some((k, what)) = TAGGABLE.iter().find(|(k, _)| *k == prefix) else {
                return Err(ApiError::invalid(
                    field,
                    format!("{id:?} is not the id of a taggable object"),
                ));
            };
            let id = validate::id(&field, k, id)?;
            if targets
                .iter()
                .any(|(_, _, x): &(&str, &str, String)| *x == id)
            {
                return Err(ApiError::invalid(field, format!("{id} is listed twice")));
            }
            targets.push((*k, *what, id));
        }
        let given: Vec<(String, String)> = if delete {
            for (i, t) in tags.iter().enumerate() {
                if t.key.is_empty() {
                    return Err(ApiError::invalid(format!("tags[{i}].key"), "required"));
                }
            }
            tags.iter()
                .map(|t| (t.key.clone(), t.value.clone()))
                .collect()
        } else {
            if tags.is_empty() {
                return Err(ApiError::invalid("tags", "at least one tag"));
            }
            validate::tags(tags)?
        };
        let ((), rev) = self
            .api
            .write(&account, |mut tx| {
                let (targets, given) = (targets.clone(), given.clone());
                async move {
                    for (k, what, id) in &targets {
                        let mut rec: serde_json::Value = tx.must(k, what, id).await?;
                        let current: Vec<(String, String)> =
                            serde_json::from_value(rec["meta"]["tags"].clone()).unwrap_or_default();
                        let mut next = current;
                        if delete {
                            next.retain(|(key, value)| {
                                !given
                                    .iter()
                                    .any(|(gk, gv)| gk == key && (gv.is_empty() || gv == value))
                            });
                        } else {
                            for (key, value) in &given {
                                match next.iter_mut().find(|(k2, _)| k2 == key) {
                                    Some(slot) => slot.1 = value.clone(),
                                    None => next.push((key.clone(), value.clone())),
                                }
                            }
                            if next.len() > validate::MAX_TAGS {
                                return Err(ApiError::invalid(
                                    "tags",
                                    format!(
                                        "{id} would have {} tags; at most {}",
                                        next.len(),
                                        validate::MAX_TAGS
                                    ),
                                ));
                            }
                        }
                        rec["meta"]["tags"] = serde_json::to_value(&next)?;
                        tx.put(k, id, &rec)?;
                    }
                    Ok((tx, ()))
                }
            })
            .await?;
        Ok(rev)
    }
}

#[tonic::async_trait]
impl TagService for Tags {
    async fn create_tags(
        &self,
        r: Request<pb::CreateTagsRequest>,
    ) -> Result<Response<pb::CreateTagsResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        let req = r.into_inner();
        let rev = self
            .change(account, &req.resource_ids, &req.tags, false)
            .await?;
        Ok(respond(pb::CreateTagsResponse {}, rev))
    }

    async fn delete_tags(
        &self,
        r: Request<pb::DeleteTagsRequest>,
    ) -> Result<Response<pb::DeleteTagsResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        let req = r.into_inner();
        let rev = self
            .change(account, &req.resource_ids, &req.tags, true)
            .await?;
        Ok(respond(pb::DeleteTagsResponse {}, rev))
    }
}

#[cfg(test)]
mod tests {

    use tonic::Code;
    use vpc_proto::v1::vpc_service_server::VpcService as _;

    use super::*;
    use crate::api::{Quotas, network::Network};

    use crate::api::test_support::{OTHER_TOKEN as OTHER, TOKEN, req, test_api};

    fn tag(k: &str, v: &str) -> pb::Tag {
        pb::Tag {
            key: k.into(),
            value: v.into(),
        }
    }

    #[tokio::test]
    async fn tags_are_added_replaced_removed_and_isolated() {
        let api = test_api(Quotas::default()).await;
        let net = Network::new(api.clone());
        let tags = Tags::new(api);
        let vpc = net
            .create_vpc(req(
                TOKEN,
                pb::CreateVpcRequest {
                    cidr_block: "10.0.0.0/16".into(),
                    tags: vec![tag("Name", "a")],
                    ..Default::default()
                },
            ))
            .await
            .expect("vpc")
            .into_inner()
            .vpc
            .expect("vpc");
        let id = vpc.vpc_id.clone();
        let describe = |net: &Network, token: &'static str, id: String| {
            let net = net.clone();
            async move {
                net.describe_vpcs(req(
                    token,
                    pb::DescribeVpcsRequest {
                        vpc_ids: vec![id],
                        ..Default::default()
                    },
                ))
                .await
                .map(|r| r.into_inner().vpcs[0].tags.clone())
            }
        };
        tags.create_tags(req(
            TOKEN,
            pb::CreateTagsRequest {
                resource_ids: vec![id.clone()],
                tags: vec![tag("Name", "b"), tag("env", "prod")],
            },
        ))
        .await
        .expect("create tags");
        assert_eq!(
            describe(&net, TOKEN, id.clone()).await.expect("d"),
            vec![tag("Name", "b"), tag("env", "prod")]
        );
        tags.delete_tags(req(
            TOKEN,
            pb::DeleteTagsRequest {
                resource_ids: vec![id.clone()],
                tags: vec![tag("env", "dev")],
            },
        ))
        .await
        .expect("delete with another value: nothing");
        assert_eq!(describe(&net, TOKEN, id.clone()).await.expect("d").len(), 2);
        tags.delete_tags(req(
            TOKEN,
            pb::DeleteTagsRequest {
                resource_ids: vec![id.clone()],
                tags: vec![tag("env", "")],
            },
        ))
        .await
        .expect("delete by key");
        assert_eq!(
            describe(&net, TOKEN, id.clone()).await.expect("d"),
            vec![tag("Name", "b")]
        );
        // Another account: NOT_FOUND. Bad ids and tags: INVALID_ARGUMENT.
        let e = tags
            .create_tags(req(
                OTHER,
                pb::CreateTagsRequest {
                    resource_ids: vec![id.clone()],
                    tags: vec![tag("x", "y")],
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        for (ids, t, field) in [
            (
                vec!["rtb-0123456789abcdef0".to_owned()],
                vec![tag("a", "b")],
                "resource_ids[0]",
            ),
            (
                vec!["vpc-12".to_owned()],
                vec![tag("a", "b")],
                "resource_ids[0]",
            ),
            (
                vec![id.clone(), id.clone()],
                vec![tag("a", "b")],
                "resource_ids[1]",
            ),
            (vec![id.clone()], vec![tag("aws:x", "b")], "tags[0].key"),
            (vec![id.clone()], vec![], "tags"),
            (vec![], vec![tag("a", "b")], "resource_ids"),
        ] {
            let e = tags
                .create_tags(req(
                    TOKEN,
                    pb::CreateTagsRequest {
                        resource_ids: ids,
                        tags: t,
                    },
                ))
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
            assert!(e.message().starts_with(field), "{field}: {}", e.message());
        }
    }
}
