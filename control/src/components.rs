//! The scheduler and the controllers as API clients with leader
//! election: in `wharf-control` beside the API server, or alone
//! (`wharf-control scheduler|controllers --kubeconfig F`) against any
//! Kubernetes API.

use std::{future::Future, path::Path};

use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};

use crate::{controllers, events, leader, scheduler};

/// Which component to run.
#[derive(Clone, Debug)]
pub enum Component {
    Scheduler,
    Controllers(controllers::Options),
}

impl Component {
    /// The Lease the replicas of this component compete for (upstream's
    /// names, in kube-system).
    fn lease(&self) -> &'static str {
        match self {
            Self::Scheduler => "kube-scheduler",
            Self::Controllers(_) => "kube-controller-manager",
        }
    }

    /// The Events' `source.component`.
    fn reporter(&self) -> &'static str {
        match self {
            Self::Scheduler => scheduler::SCHEDULER_NAME,
            Self::Controllers(_) => "kube-controller-manager",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ComponentError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("API client: {0}")]
    Client(#[from] kube::Error),
}

/// A client from a kubeconfig file.
pub async fn client(path: &Path) -> Result<Client, ComponentError> {
    let kubeconfig_error = |source| ComponentError::Kubeconfig {
        path: path.display().to_string(),
        source,
    };
    let kubeconfig = Kubeconfig::read_from(path).map_err(kubeconfig_error)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(kubeconfig_error)?;
    Ok(Client::try_from(config)?)
}

/// Runs `component` whenever this replica leads, until `shutdown`.
pub async fn run(component: Component, client: Client, shutdown: impl Future<Output = ()>) {
    let elector =
        leader::Elector::new(client.clone(), component.lease(), leader::Timing::default());
    tracing::info!(
        lease = component.lease(),
        identity = elector.identity(),
        "candidate"
    );
    elector
        .run(
            || {
                let (recorder, writer) = events::recorder(client.clone(), component.reporter());
                let client = client.clone();
                let component = component.clone();
                async move {
                    let work = async move {
                        match component {
                            Component::Scheduler => scheduler::run(client, recorder).await,
                            Component::Controllers(options) => {
                                controllers::run(client, recorder, options).await;
                            }
                        }
                    };
                    tokio::join!(writer.run(), work);
                }
            },
            shutdown,
        )
        .await;
}
