//! The emulator's mutable state: identities, clients, faults and accounting.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use serde_json::Value;

use super::{
    EmulatorError,
    certs::{self, CertError},
    config::{EmulatorConfig, ManagedIdentity, RegisteredClient},
    faults::{CallCount, Endpoint, Fault, FaultAction, IssuedRecord, RequestRecord},
};

/// Keep at most this many request and issued-token records (a benchmark must
/// not grow the emulator without bound); counts are kept for every request.
const MAX_RECORDS: usize = 100_000;

/// A registered client with its certificates parsed.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    pub(crate) tenant_id: String,
    pub(crate) client_id: String,
    pub(crate) secret: Option<String>,
    pub(crate) certificates: Vec<ClientCert>,
}

/// A registered certificate.
#[derive(Debug, Clone)]
pub(crate) struct ClientCert {
    pub(crate) x5t: String,
    pub(crate) x5t_s256: String,
    pub(crate) public_key: rsa::PublicKey,
}

impl Client {
    fn parse(c: &RegisteredClient) -> Result<Self, CertError> {
        let certificates = c
            .certificates
            .iter()
            .map(|text| {
                let der = certs::cert_der_from_text(text)?;
                Ok(ClientCert {
                    x5t: certs::thumbprint_sha1(&der),
                    x5t_s256: certs::thumbprint_sha256(&der),
                    public_key: certs::public_key_of(&der)?,
                })
            })
            .collect::<Result<_, CertError>>()?;
        Ok(Self {
            tenant_id: c.tenant_id.clone(),
            client_id: c.client_id.clone(),
            secret: c.secret.clone(),
            certificates,
        })
    }
}

/// What a fault check decided.
pub(crate) struct FaultDecision {
    pub(crate) delay: Option<Duration>,
    pub(crate) action: Option<FaultAction>,
}

pub(crate) struct State {
    pub(crate) token_lifetime: Duration,
    pub(crate) tenant_id: String,
    pub(crate) system_assigned: Option<ManagedIdentity>,
    pub(crate) user_assigned: Vec<ManagedIdentity>,
    pub(crate) clients: Vec<Client>,
    pub(crate) instance: Value,
    pub(crate) known_resources: Option<Vec<String>>,
    faults: Vec<Fault>,
    counts: BTreeMap<(Endpoint, String, String), u64>,
    requests: VecDeque<RequestRecord>,
    issued: VecDeque<IssuedRecord>,
}

/// State shared by the server tasks and the handle.
pub(crate) struct Shared {
    state: Mutex<State>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// Counts a token request as in flight while alive.
pub(crate) struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Shared {
    pub(crate) fn new(config: &EmulatorConfig) -> Result<Self, EmulatorError> {
        let clients = config
            .clients
            .iter()
            .map(|c| {
                Client::parse(c).map_err(|source| EmulatorError::Client {
                    client_id: c.client_id.clone(),
                    source,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            state: Mutex::new(State {
                token_lifetime: config.token_lifetime(),
                tenant_id: config.tenant_id.clone(),
                system_assigned: config.system_assigned.clone(),
                user_assigned: config.user_assigned.clone(),
                clients,
                instance: config.instance_document(),
                known_resources: config.known_resources.clone(),
                faults: Vec::new(),
                counts: BTreeMap::new(),
                requests: VecDeque::new(),
                issued: VecDeque::new(),
            }),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        })
    }

    /// Locks the state. A panic while holding the lock cannot leave it
    /// inconsistent (every update is a single step), so poisoning is ignored.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn enter(&self) -> InFlight<'_> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(self)
    }

    pub(crate) fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    pub(crate) fn register_client(&self, client: &RegisteredClient) -> Result<(), CertError> {
        let parsed = Client::parse(client)?;
        let mut st = self.lock();
        st.clients.retain(|c| {
            !(c.client_id.eq_ignore_ascii_case(&parsed.client_id)
                && c.tenant_id.eq_ignore_ascii_case(&parsed.tenant_id))
        });
        st.clients.push(parsed);
        Ok(())
    }

    pub(crate) fn reset(&self) {
        let mut st = self.lock();
        st.faults.clear();
        st.counts.clear();
        st.requests.clear();
        st.issued.clear();
        self.max_in_flight
            .store(self.in_flight.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

impl State {
    pub(crate) fn add_fault(&mut self, fault: Fault) {
        self.faults.push(fault);
    }

    pub(crate) fn clear_faults(&mut self) {
        self.faults.clear();
    }

    pub(crate) fn faults(&self) -> Vec<Fault> {
        self.faults.clone()
    }

    /// Takes the first matching delay and the first matching answer rule,
    /// consuming one use of each.
    pub(crate) fn take_faults(
        &mut self,
        endpoint: Endpoint,
        client_id: Option<&str>,
    ) -> FaultDecision {
        let mut decision = FaultDecision {
            delay: None,
            action: None,
        };
        for fault in &mut self.faults {
            if !fault.matches(endpoint, client_id) {
                continue;
            }
            let used = match &fault.action {
                FaultAction::Delay { millis } if decision.delay.is_none() => {
                    decision.delay = Some(Duration::from_millis(*millis));
                    true
                }
                FaultAction::Status { .. } | FaultAction::Drop if decision.action.is_none() => {
                    decision.action = Some(fault.action.clone());
                    true
                }
                _ => false,
            };
            if used && let Some(n) = fault.times.as_mut() {
                *n = n.saturating_sub(1);
            }
        }
        self.faults.retain(|f| f.times != Some(0));
        decision
    }

    pub(crate) fn record(&mut self, record: RequestRecord) {
        *self
            .counts
            .entry((
                record.endpoint,
                record.client_id.to_ascii_lowercase(),
                record.resource.clone(),
            ))
            .or_default() += 1;
        if self.requests.len() >= MAX_RECORDS {
            self.requests.pop_front();
        }
        self.requests.push_back(record);
    }

    pub(crate) fn record_issued(&mut self, issued: IssuedRecord) {
        if self.issued.len() >= MAX_RECORDS {
            self.issued.pop_front();
        }
        self.issued.push_back(issued);
    }

    pub(crate) fn count(&self, endpoint: Endpoint, client_id: &str, resource: &str) -> u64 {
        self.counts
            .get(&(
                endpoint,
                client_id.to_ascii_lowercase(),
                resource.to_owned(),
            ))
            .copied()
            .unwrap_or(0)
    }

    pub(crate) fn counts(&self) -> Vec<CallCount> {
        self.counts
            .iter()
            .map(|((endpoint, client_id, resource), count)| CallCount {
                endpoint: *endpoint,
                client_id: client_id.clone(),
                resource: resource.clone(),
                count: *count,
            })
            .collect()
    }

    pub(crate) fn requests(&self) -> Vec<RequestRecord> {
        self.requests.iter().cloned().collect()
    }

    pub(crate) fn issued(&self) -> Vec<IssuedRecord> {
        self.issued.iter().cloned().collect()
    }

    /// Finds an assigned identity by client id, object id or resource id.
    pub(crate) fn find_identity(&self, by: IdentityQuery<'_>) -> Option<&ManagedIdentity> {
        let mut all = self.system_assigned.iter().chain(self.user_assigned.iter());
        match by {
            IdentityQuery::System => self.system_assigned.as_ref(),
            IdentityQuery::ClientId(id) => all.find(|i| i.client_id.eq_ignore_ascii_case(id)),
            IdentityQuery::ObjectId(id) => all.find(|i| i.object_id.eq_ignore_ascii_case(id)),
            IdentityQuery::ResourceId(id) => all.find(|i| i.resource_id.eq_ignore_ascii_case(id)),
        }
    }

    pub(crate) fn assign(&mut self, identity: ManagedIdentity) {
        self.user_assigned
            .retain(|i| !i.client_id.eq_ignore_ascii_case(&identity.client_id));
        self.user_assigned.push(identity);
    }

    pub(crate) fn unassign(&mut self, client_id: &str) -> bool {
        let before = self.user_assigned.len();
        self.user_assigned
            .retain(|i| !i.client_id.eq_ignore_ascii_case(client_id));
        before != self.user_assigned.len()
    }

    pub(crate) fn tenant_known(&self, tenant: &str) -> bool {
        tenant.eq_ignore_ascii_case(&self.tenant_id)
            || self
                .clients
                .iter()
                .any(|c| c.tenant_id.eq_ignore_ascii_case(tenant))
    }

    pub(crate) fn client(&self, tenant: &str, client_id: &str) -> Option<&Client> {
        self.clients.iter().find(|c| {
            c.tenant_id.eq_ignore_ascii_case(tenant) && c.client_id.eq_ignore_ascii_case(client_id)
        })
    }

    pub(crate) fn resource_known(&self, resource: &str) -> bool {
        match &self.known_resources {
            None => true,
            Some(list) => list.iter().any(|r| r == resource),
        }
    }
}

/// How an IMDS request names its identity.
#[derive(Debug, Clone, Copy)]
pub(crate) enum IdentityQuery<'a> {
    System,
    ClientId(&'a str),
    ObjectId(&'a str),
    ResourceId(&'a str),
}
