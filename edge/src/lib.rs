//! The Cloudflare Worker: converts `worker` requests to [`edge_core::Request`], serves them
//! with [`edge_core::App`], and implements [`edge_core::Platform`] on `fetch`, WebCrypto,
//! `Date`, timers, the rate-limit binding and `console.log`.
#![cfg(target_arch = "wasm32")]

use std::cell::RefCell;
use std::sync::OnceLock;
use std::time::Duration;

use edge_core::api::MAX_BODY_BYTES;
use edge_core::model::IntentModel;
use edge_core::{App, Config, HttpRequest, HttpResponse, Platform};
use js_sys::{Object, Reflect, Uint8Array};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use worker::{Context, Date, Delay, Env, Fetch, Headers, Method, RequestInit, event};

/// One `App` per isolate, built from the first request's environment.
static APP: OnceLock<App> = OnceLock::new();

/// Loads the intent model when the isolate starts, before the first request arrives.
#[event(start)]
fn start() {
    let _ = IntentModel::embedded();
}

/// The request's body, read no further than one byte past [`MAX_BODY_BYTES`]: the core refuses
/// a body that long with 413 whatever its route, and a larger upload (Cloudflare passes up to
/// 100 MB on most plans) never has to fit in the isolate's memory. An unreadable body reads as
/// empty, which the core refuses as it refuses any other.
async fn capped_body(req: &mut worker::Request) -> Vec<u8> {
    use futures_util::StreamExt;
    let Ok(mut stream) = req.stream() else {
        // No body at all (a GET).
        return Vec::new();
    };
    let mut body = Vec::new();
    while let Some(Ok(piece)) = stream.next().await {
        body.extend_from_slice(&piece);
        if body.len() > MAX_BODY_BYTES {
            body.truncate(MAX_BODY_BYTES + 1);
            break;
        }
    }
    body
}

#[event(fetch)]
async fn fetch(
    mut req: worker::Request,
    env: Env,
    ctx: Context,
) -> worker::Result<worker::Response> {
    // `/hello` answers without the core: the baseline the edge benchmark compares against,
    // there only when the benchmark sets `BENCH_ROUTES` (elsewhere it is a 404 like any
    // unknown path). A POST reads its body first, as `/v1/chat` does, so the two differ only
    // by the core; other paths do not even look the variable up.
    if req.path() == "/hello" && var(&env, "BENCH_ROUTES").is_some_and(|v| v == "1") {
        if req.method() == Method::Post {
            req.bytes().await?;
        }
        return worker::Response::ok("hello");
    }
    let app = APP.get_or_init(|| App::new(Config::from_env(|k| var(&env, k))));
    let url = req.url()?;
    let core_req = edge_core::Request {
        method: req.method().to_string(),
        path: url.path().to_owned(),
        query: url.query().unwrap_or("").to_owned(),
        headers: req
            .headers()
            .entries()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect(),
        body: capped_body(&mut req).await,
    };
    let health = core_req.path == "/healthz";
    let platform = Cf {
        env: &env,
        logs: RefCell::default(),
    };
    let res = app.handle(&platform, core_req).await;
    let logs = platform.logs.take();
    if !logs.is_empty() {
        // Written once the response is on its way: the caller does not wait for the logs.
        ctx.wait_until(async move {
            Delay::from(Duration::ZERO).await;
            for line in logs {
                worker::console_log!("{line}");
            }
        });
    }
    let headers = Headers::new();
    for (k, v) in &res.headers {
        headers.append(k, v)?;
    }
    if health {
        // The isolate's WASM linear memory (it only grows): the load test watches it.
        let bytes = core::arch::wasm32::memory_size(0) as u64 * 65_536;
        headers.append("x-wasm-memory-bytes", &bytes.to_string())?;
    }
    Ok(worker::Response::from_bytes(res.body)?
        .with_status(res.status)
        .with_headers(headers))
}

/// A secret (`wrangler dev` reads them from `.dev.vars`) or `[vars]` value as text. A value written in `wrangler.toml` as a number or a
/// boolean (`RATE_LIMIT_PER_MINUTE = 1200`) reaches the Worker as one, which `Env::var`
/// refuses; it is read as its JSON text instead of being taken for absent.
fn var(env: &Env, name: &str) -> Option<String> {
    let v = Reflect::get(env, &JsValue::from(name)).ok()?;
    if v.is_undefined() || v.is_null() {
        return None;
    }
    v.as_string()
        .or_else(|| js_sys::JSON::stringify(&v).ok().and_then(|s| s.as_string()))
}

struct Cf<'a> {
    env: &'a Env,
    /// Log lines of this request, written after the response (see `fetch`).
    logs: RefCell<Vec<String>>,
}

fn js_err(e: JsValue) -> String {
    e.as_string()
        .or_else(|| {
            Reflect::get(&e, &"message".into())
                .ok()
                .and_then(|m| m.as_string())
        })
        .unwrap_or_else(|| format!("{e:?}"))
}

fn crypto() -> Result<web_sys::Crypto, String> {
    Reflect::get(&js_sys::global(), &"crypto".into())
        .map_err(js_err)?
        .dyn_into::<web_sys::Crypto>()
        .map_err(|_| "globalThis.crypto is missing".to_owned())
}

impl Platform for Cf<'_> {
    async fn http(&self, req: HttpRequest) -> Result<HttpResponse, String> {
        let headers = Headers::new();
        for (k, v) in &req.headers {
            headers.set(k, v).map_err(|e| e.to_string())?;
        }
        let mut init = RequestInit::new();
        init.with_method(Method::from(req.method.to_owned()))
            .with_headers(headers);
        if let Some(body) = &req.body {
            init.with_body(Some(Uint8Array::from(body.as_slice()).into()));
        }
        let request = worker::Request::new_with_init(&req.url, &init).map_err(|e| e.to_string())?;
        let mut resp = Fetch::Request(request)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status_code();
        let body = resp.bytes().await.map_err(|e| e.to_string())?;
        Ok(HttpResponse { status, body })
    }

    fn now_ms(&self) -> u64 {
        Date::now().as_millis()
    }

    fn random(&self, buf: &mut [u8]) {
        // Without WebCrypto there is no Worker at all; fall back to the clock only to stay total.
        if crypto()
            .and_then(|c| c.get_random_values_with_u8_array(buf).map_err(js_err))
            .is_err()
        {
            let t = Date::now().as_millis();
            for (i, b) in buf.iter_mut().enumerate() {
                *b = (t >> ((i % 8) * 8)) as u8 ^ (i as u8).wrapping_mul(151);
            }
        }
    }

    async fn sleep(&self, ms: u64) {
        Delay::from(Duration::from_millis(ms)).await;
    }

    async fn sign_rs256(&self, pkcs8_der: &[u8], msg: &[u8]) -> Result<Vec<u8>, String> {
        let subtle = crypto()?.subtle();
        let alg = Object::new();
        Reflect::set(&alg, &"name".into(), &"RSASSA-PKCS1-v1_5".into()).map_err(js_err)?;
        Reflect::set(&alg, &"hash".into(), &"SHA-256".into()).map_err(js_err)?;
        let usages = js_sys::Array::of1(&"sign".into());
        let key_data: Object = Uint8Array::from(pkcs8_der).into();
        let key = JsFuture::from(
            subtle
                .import_key_with_object("pkcs8", &key_data, &alg, false, &usages)
                .map_err(js_err)?,
        )
        .await
        .map_err(js_err)?
        .dyn_into::<web_sys::CryptoKey>()
        .map_err(|_| "importKey returned no CryptoKey".to_owned())?;
        let sig = JsFuture::from(
            subtle
                .sign_with_str_and_u8_array("RSASSA-PKCS1-v1_5", &key, msg)
                .map_err(js_err)?,
        )
        .await
        .map_err(js_err)?;
        Ok(Uint8Array::new(&sig).to_vec())
    }

    async fn rate_limit(&self, key: &str) -> Option<bool> {
        let limiter = self.env.rate_limiter("RATE_LIMITER").ok()?;
        limiter.limit(key.to_owned()).await.ok().map(|o| o.success)
    }

    fn log(&self, line: &str) {
        self.logs.borrow_mut().push(line.to_owned());
    }
}
