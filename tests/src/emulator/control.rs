//! The emulator's own control API under `/_emulator/` (a path real Azure does
//! not serve), mirroring the methods of [`super::EmulatorHandle`]:
//!
//! | request | effect |
//! |---|---|
//! | `GET /_emulator/healthz` | 200 `ok` |
//! | `GET /_emulator/calls` | `{"counts":[CallCount…],"max_concurrent":n}` |
//! | `GET /_emulator/requests` | `[RequestRecord…]` |
//! | `GET /_emulator/tokens` | `[IssuedRecord…]` (the tokens themselves) |
//! | `GET /_emulator/faults` | `[Fault…]` |
//! | `POST /_emulator/faults` body `Fault` | add a fault rule |
//! | `DELETE /_emulator/faults` | clear fault rules |
//! | `POST /_emulator/reset` | clear counts, records, issued tokens, faults |
//! | `POST /_emulator/identities` body `ManagedIdentity` | assign to the VM |
//! | `DELETE /_emulator/identities/{client_id}` | unassign |
//! | `POST /_emulator/clients` body `RegisteredClient` | register a client |
//! | `PUT /_emulator/token-lifetime` body `{"seconds":n}` | set token lifetime |

use std::time::Duration;

use http::{Method, Response, request::Parts};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::{
    config::{ManagedIdentity, RegisteredClient},
    faults::Fault,
    respond::{self, Body},
    state::Shared,
};

fn bad_request(message: &str) -> Response<Body> {
    respond::json(400, &json!({"error": message}))
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Box<Response<Body>>> {
    serde_json::from_slice(body)
        .map_err(|e| Box::new(bad_request(&format!("invalid JSON body: {e}"))))
}

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// Handles one control request.
pub(crate) fn handle(shared: &Shared, parts: &Parts, body: &[u8]) -> Response<Body> {
    let path = parts.uri.path().trim_end_matches('/');
    match (&parts.method, path) {
        (&Method::GET, "/_emulator/healthz") => respond::json(200, &json!("ok")),
        (&Method::GET, "/_emulator/calls") => {
            let counts = shared.lock().counts();
            respond::json(
                200,
                &json!({"counts": to_json(&counts), "max_concurrent": shared.max_in_flight()}),
            )
        }
        (&Method::GET, "/_emulator/requests") => {
            respond::json(200, &to_json(&shared.lock().requests()))
        }
        (&Method::GET, "/_emulator/tokens") => {
            respond::json(200, &to_json(&shared.lock().issued()))
        }
        (&Method::GET, "/_emulator/faults") => {
            respond::json(200, &to_json(&shared.lock().faults()))
        }
        (&Method::POST, "/_emulator/faults") => match parse::<Fault>(body) {
            Ok(fault) => {
                shared.lock().add_fault(fault);
                respond::empty(204)
            }
            Err(resp) => *resp,
        },
        (&Method::DELETE, "/_emulator/faults") => {
            shared.lock().clear_faults();
            respond::empty(204)
        }
        (&Method::POST, "/_emulator/reset") => {
            shared.reset();
            respond::empty(204)
        }
        (&Method::POST, "/_emulator/identities") => match parse::<ManagedIdentity>(body) {
            Ok(identity) => {
                shared.lock().assign(identity);
                respond::empty(204)
            }
            Err(resp) => *resp,
        },
        (&Method::DELETE, p) if p.starts_with("/_emulator/identities/") => {
            let client_id = p.trim_start_matches("/_emulator/identities/");
            if shared.lock().unassign(client_id) {
                respond::empty(204)
            } else {
                respond::json(404, &json!({"error": "no such identity"}))
            }
        }
        (&Method::POST, "/_emulator/clients") => match parse::<RegisteredClient>(body) {
            Ok(client) => match shared.register_client(&client) {
                Ok(()) => respond::empty(204),
                Err(e) => bad_request(&e.to_string()),
            },
            Err(resp) => *resp,
        },
        (&Method::PUT, "/_emulator/token-lifetime") => match parse::<Value>(body) {
            Ok(v) => match v["seconds"].as_u64() {
                Some(secs) if secs > 0 => {
                    shared.lock().token_lifetime = Duration::from_secs(secs);
                    respond::empty(204)
                }
                _ => bad_request("expected {\"seconds\": n} with n > 0"),
            },
            Err(resp) => *resp,
        },
        _ => respond::json(404, &json!({"error": "unknown emulator control path"})),
    }
}
