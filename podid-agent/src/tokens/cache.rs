//! The token cache: entries keyed by [`CacheKey`], least-recently-used
//! eviction, and the bookkeeping for single flight and refresh.
//!
//! Pure data under one lock; the service decides what to do with it.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use tokio::{sync::watch, task::AbortHandle};

use super::{
    Credential, IssuedToken, TokenError,
    credential::{CacheKey, Resolved},
};

/// What every waiter of a flight gets.
pub(crate) type FlightResult = Result<Arc<IssuedToken>, TokenError>;

/// An upstream call in progress for one key.
pub(crate) struct Flight {
    pub(crate) id: u64,
    pub(crate) rx: watch::Receiver<Option<FlightResult>>,
    /// Started by a request that had no usable token (its waiters get the
    /// new token), rather than as a refresh.
    pub(crate) for_miss: bool,
}

/// One cached token and its refresh state.
pub(crate) struct Entry {
    pub(crate) resolved: Resolved,
    pub(crate) credential: Credential,
    pub(crate) token: Option<Arc<IssuedToken>>,
    /// When the token should be replaced (unix ms).
    pub(crate) refresh_at_ms: u64,
    /// No refresh before this (unix ms), after failed refreshes.
    pub(crate) retry_at_ms: u64,
    /// Failed refreshes in a row.
    pub(crate) failures: u32,
    /// A request asked for this key since the token was installed; idle
    /// entries are dropped instead of refreshed.
    pub(crate) requested: bool,
    pub(crate) flight: Option<Flight>,
    /// The pending refresh timer, aborted when the entry goes.
    pub(crate) timer: Option<AbortHandle>,
    tick: u64,
}

impl Entry {
    pub(crate) fn set_timer(&mut self, timer: AbortHandle) {
        if let Some(old) = self.timer.replace(timer) {
            old.abort();
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        if let Some(timer) = self.timer.take() {
            timer.abort();
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// When to refresh a token obtained at `obtained_ms`: `refresh_ahead`
/// before expiry or with a third of its lifetime left, whichever is first,
/// and at least twice the safety margin ahead (so the old token is still
/// servable while the refresh runs), but not before half its lifetime.
pub(crate) fn refresh_at_ms(
    token: &IssuedToken,
    obtained_ms: u64,
    refresh_ahead: Duration,
    safety_margin: Duration,
) -> u64 {
    let expires_ms = token.expires_on.saturating_mul(1000);
    let lifetime = expires_ms.saturating_sub(obtained_ms);
    let ahead = millis(refresh_ahead)
        .max(lifetime / 3)
        .max(millis(safety_margin).saturating_mul(2))
        .min(lifetime / 2);
    expires_ms - ahead
}

/// Whether a cached token may still be served at `now_ms`.
pub(crate) fn servable(token: &IssuedToken, now_ms: u64, safety_margin: Duration) -> bool {
    now_ms.saturating_add(millis(safety_margin)) < token.expires_on.saturating_mul(1000)
}

/// Entries plus their use order.
pub(crate) struct Cache {
    entries: HashMap<CacheKey, Entry>,
    order: BTreeMap<u64, CacheKey>,
    tick: u64,
    next_flight: u64,
    max_entries: usize,
}

impl Cache {
    pub(crate) fn new(max_entries: usize) -> Self {
        Self {
            entries: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
            next_flight: 0,
            max_entries,
        }
    }

    pub(crate) fn flight_id(&mut self) -> u64 {
        self.next_flight += 1;
        self.next_flight
    }

    /// The entry for `key`, marked most recently used.
    pub(crate) fn touch(&mut self, key: &CacheKey) -> Option<&mut Entry> {
        self.tick += 1;
        let tick = self.tick;
        let entry = self.entries.get_mut(key)?;
        self.order.remove(&entry.tick);
        entry.tick = tick;
        self.order.insert(tick, key.clone());
        Some(entry)
    }

    /// The entry for `key` without changing the use order.
    pub(crate) fn get_mut(&mut self, key: &CacheKey) -> Option<&mut Entry> {
        self.entries.get_mut(key)
    }

    /// Inserts an empty entry for `key` (most recently used), evicting the
    /// least recently used entries beyond `max_entries` (preferring ones
    /// with no upstream call in flight).
    pub(crate) fn insert(&mut self, resolved: &Resolved, credential: &Credential) -> &mut Entry {
        let key = resolved.key.clone();
        self.remove(&key);
        while self.entries.len() >= self.max_entries {
            let victim = self
                .order
                .values()
                .find(|k| self.entries.get(*k).is_some_and(|e| e.flight.is_none()))
                .or_else(|| self.order.values().next())
                .cloned();
            match victim {
                Some(victim) => {
                    tracing::debug!(identity = %victim.identity, resource = %victim.resource, "evicting least recently used token");
                    self.remove(&victim);
                }
                None => break,
            }
        }
        self.tick += 1;
        self.order.insert(self.tick, key.clone());
        self.entries.entry(key).or_insert(Entry {
            resolved: resolved.clone(),
            credential: credential.clone(),
            token: None,
            refresh_at_ms: 0,
            retry_at_ms: 0,
            failures: 0,
            requested: true,
            flight: None,
            timer: None,
            tick: self.tick,
        })
    }

    pub(crate) fn remove(&mut self, key: &CacheKey) -> Option<Entry> {
        let entry = self.entries.remove(key)?;
        self.order.remove(&entry.tick);
        Some(entry)
    }

    /// Removes every entry of `identity`; returns how many.
    pub(crate) fn remove_identity(&mut self, identity: &str) -> usize {
        let keys: Vec<CacheKey> = self
            .entries
            .keys()
            .filter(|k| k.identity == identity)
            .cloned()
            .collect();
        for key in &keys {
            self.remove(key);
        }
        keys.len()
    }

    /// Entries holding a token.
    pub(crate) fn token_count(&self) -> usize {
        self.entries.values().filter(|e| e.token.is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::credential::resolve;

    fn token(expires_on: u64) -> IssuedToken {
        IssuedToken::new(
            "t".into(),
            expires_on,
            0,
            "Bearer".into(),
            "r".into(),
            String::new(),
        )
    }

    #[test]
    fn refresh_point_is_the_earlier_of_ahead_and_a_third_but_not_before_half() {
        let (ahead, margin) = (Duration::from_secs(300), Duration::from_secs(60));
        // 24 h token: a third (8 h) beats 5 min.
        let day = token(86_400);
        assert_eq!(refresh_at_ms(&day, 0, ahead, margin), 57_600_000);
        // 10 min token: 5 min ahead beats a third (200 s).
        let short = token(600);
        assert_eq!(refresh_at_ms(&short, 0, ahead, margin), 300_000);
        // 4 min token: 5 min ahead would be before it was issued; half-life.
        let tiny = token(240);
        assert_eq!(refresh_at_ms(&tiny, 0, ahead, margin), 120_000);
        // A large safety margin moves the refresh earlier.
        assert_eq!(
            refresh_at_ms(&day, 0, ahead, Duration::from_secs(6 * 3600)),
            43_200_000
        );
        assert_eq!(
            refresh_at_ms(&short, 0, Duration::ZERO, Duration::from_secs(120)),
            360_000
        );
    }

    #[test]
    fn tokens_inside_the_safety_margin_are_not_servable() {
        let t = token(100);
        assert!(servable(&t, 39_999, Duration::from_secs(60)));
        assert!(!servable(&t, 40_000, Duration::from_secs(60)));
        assert!(!servable(&t, 100_000, Duration::ZERO));
    }

    #[test]
    fn evicts_least_recently_used() {
        let mut cache = Cache::new(2);
        let credential = Credential::NodeIdentity { selector: None };
        let key = |r: &str| resolve("ns/a", &credential, r, "https://login", &[]).expect("valid");
        let (a, b, c) = (key("a"), key("b"), key("c"));
        cache.insert(&a, &credential).token = Some(Arc::new(token(10)));
        cache.insert(&b, &credential).token = Some(Arc::new(token(10)));
        assert!(cache.touch(&a.key).is_some(), "a is now the most recent");
        cache.insert(&c, &credential);
        assert!(cache.get_mut(&b.key).is_none(), "b was least recently used");
        assert!(cache.get_mut(&a.key).is_some());
        assert!(cache.get_mut(&c.key).is_some());
        assert_eq!(cache.token_count(), 1, "c has no token yet");
        assert_eq!(cache.remove_identity("ns/a"), 2);
        assert!(cache.get_mut(&a.key).is_none());
    }
}
