//! ServiceAccounts: every active namespace has `default`.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::{
    Api, ResourceExt,
    api::{ObjectMeta, PostParams},
    runtime::{controller::Action, reflector::ObjectRef},
};

use super::{Context, Error};
use crate::pods;

pub(super) async fn reconcile(
    namespace: Arc<Namespace>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let name = namespace.name_any();
    let present = ctx
        .service_accounts
        .get(&ObjectRef::new("default").within(&name))
        .is_some();
    if present || pods::is_deleting(&namespace.metadata) {
        return Ok(Action::await_change());
    }
    let account = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("default".to_owned()),
            ..Default::default()
        },
        ..Default::default()
    };
    match Api::<ServiceAccount>::namespaced(ctx.client.clone(), &name)
        .create(&PostParams::default(), &account)
        .await
    {
        Ok(_) => Ok(Action::await_change()),
        // Created meanwhile, or the namespace started terminating.
        Err(kube::Error::Api(status)) if status.code == 409 || status.code == 403 => {
            Ok(Action::await_change())
        }
        Err(error) => Err(Error::api("creating the default service account in", name)(
            error,
        )),
    }
}
