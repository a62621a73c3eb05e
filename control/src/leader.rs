//! Leader election through a `coordination.k8s.io` Lease, as client-go's
//! `leaderelection`: one replica of the scheduler or the controllers acts,
//! the others wait to take over.
//!
//! Expiry is judged by when this replica *observed* the lease change, not
//! by the `renewTime` the holder wrote, so clock skew between replicas
//! cannot make two of them leaders. A leader that fails to renew for
//! `renew_deadline` stops its work before the lease can expire for others
//! (`lease_duration` > `renew_deadline`).

use std::{future::Future, time::Duration};

use chrono::Utc;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tokio::time::Instant;
use tracing::{info, warn};

/// client-go's defaults for kube-scheduler and kube-controller-manager.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lease {name}: {source}")]
    Api {
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// One candidate for one lease.
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    /// The last lease spec seen and when: expiry counts from there.
    observed: Option<(LeaseSpec, Instant)>,
}

/// What one attempt found.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    Held,
    HeldByOther(String),
    /// Someone wrote the lease between our read and write.
    Raced,
}

impl Elector {
    /// A candidate for lease `kube-system/<name>` with a unique identity
    /// (`<hostname>_<random>`, as upstream).
    pub fn new(client: Client, name: &str, timing: Timing) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "wharf".to_owned());
        Self {
            api: Api::namespaced(client, "kube-system"),
            name: name.to_owned(),
            identity: format!("{host}_{:016x}", rand::random::<u64>()),
            timing,
            observed: None,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn api_error(&self, source: kube::Error) -> LeaderError {
        LeaderError::Api {
            name: self.name.clone(),
            source,
        }
    }

    /// Runs `work` whenever this candidate holds the lease, until
    /// `shutdown` resolves (then releases the lease so another replica
    /// takes over at once). Losing the lease drops the running `work`
    /// future, which must therefore own every task it starts.
    pub async fn run<F, Fut>(mut self, mut work: F, shutdown: impl Future<Output = ()>)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = ()>,
    {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                () = self.acquire() => {}
            }
            info!(lease = %self.name, identity = %self.identity, "became leader");
            let lost = tokio::select! {
                () = &mut shutdown => false,
                () = work() => {
                    warn!(lease = %self.name, "work ended while leading");
                    false
                }
                () = self.keep() => true,
            };
            if lost {
                warn!(lease = %self.name, "lost the lease; stopped acting");
                continue;
            }
            self.release().await;
            return;
        }
    }

    async fn acquire(&mut self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Held) => return,
                Ok(Attempt::HeldByOther(holder)) => {
                    tracing::debug!(lease = %self.name, %holder, "lease held by another replica");
                }
                Ok(Attempt::Raced) => {}
                Err(error) => warn!(%error, "acquiring the lease"),
            }
            tokio::time::sleep(self.timing.retry_period).await;
        }
    }

    /// Renews every retry period; returns once renewal failed for longer
    /// than the renew deadline.
    async fn keep(&mut self) {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(self.timing.retry_period).await;
            // A renewal that hangs must not outlive the deadline: the
            // lease may be someone else's by then.
            let left = self.timing.renew_deadline.saturating_sub(renewed.elapsed());
            match tokio::time::timeout(left, self.try_acquire_or_renew()).await {
                Ok(Ok(Attempt::Held)) => renewed = Instant::now(),
                Ok(Ok(other)) => warn!(lease = %self.name, ?other, "renewal refused"),
                Ok(Err(error)) => warn!(%error, "renewing the lease"),
                Err(_) => warn!(lease = %self.name, "renewal timed out"),
            }
            if renewed.elapsed() >= self.timing.renew_deadline {
                return;
            }
        }
    }

    async fn try_acquire_or_renew(&mut self) -> Result<Attempt, LeaderError> {
        let now = Utc::now();
        let Some(mut lease) = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| self.api_error(e))?
        else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec_for_me(None, now)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(created.spec.unwrap_or_default());
                    Ok(Attempt::Held)
                }
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(Attempt::Raced),
                Err(error) => Err(self.api_error(error)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        self.observe(spec.clone());
        let holder = spec.holder_identity.clone().unwrap_or_default();
        if !holder.is_empty() && holder != self.identity && !self.expired() {
            return Ok(Attempt::HeldByOther(holder));
        }
        lease.spec = Some(self.spec_for_me(Some(&spec), now));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(replaced) => {
                self.observe(replaced.spec.unwrap_or_default());
                Ok(Attempt::Held)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Attempt::Raced),
            Err(error) => Err(self.api_error(error)),
        }
    }

    fn spec_for_me(&self, previous: Option<&LeaseSpec>, now: chrono::DateTime<Utc>) -> LeaseSpec {
        let mine = previous.and_then(|p| p.holder_identity.as_deref()) == Some(&self.identity);
        let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: i32::try_from(self.timing.lease_duration.as_secs()).ok(),
            acquire_time: if mine {
                previous.and_then(|p| p.acquire_time.clone())
            } else {
                Some(MicroTime(now))
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(if mine || previous.is_none() {
                transitions
            } else {
                transitions + 1
            }),
            ..Default::default()
        }
    }

    fn observe(&mut self, spec: LeaseSpec) {
        if self.observed.as_ref().is_none_or(|(seen, _)| *seen != spec) {
            self.observed = Some((spec, Instant::now()));
        }
    }

    /// No change to the lease for its whole duration since we saw it.
    fn expired(&self) -> bool {
        self.observed.as_ref().is_none_or(|(spec, at)| {
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.timing.lease_duration, Duration::from_secs);
            at.elapsed() > duration
        })
    }

    /// Gives the lease up: an empty holder lets the next candidate take
    /// it on its next attempt instead of after the lease duration.
    async fn release(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Utc::now()));
        if let Err(error) = self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            warn!(%error, lease = %self.name, "releasing the lease");
        }
    }
}
