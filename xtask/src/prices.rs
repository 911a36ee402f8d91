//! Every price the cost model uses, with where it comes from and when it was read.
//! Update the constants and their dates together.

/// KRW per USD (Bank of Korea reference rate, rounded; read 2026-11).
pub const KRW_PER_USD: f64 = 1_400.0;

/// An always-on GPU VM able to serve the 3B model: the team's own quote for this chatbot
/// (≈ 200,000 KRW a month; project brief, 2026).
pub const ALWAYS_ON_GPU_KRW_PER_MONTH: f64 = 200_000.0;

/// A spot/preemptible VM of the same kind costs about 80 % less (project brief, 2026; GCE spot
/// discounts for G2 are 60–91 %, cloud.google.com/spot-vms/pricing, read 2026-11).
pub const SPOT_DISCOUNT: f64 = 0.80;

/// Hours in a billing month (GCE bills per second; 730 h is its monthly convention).
pub const HOURS_PER_MONTH: f64 = 730.0;

/// Cloudflare Workers Paid: 5 USD a month including 10 million requests, then 0.30 USD per
/// million (developers.cloudflare.com/workers/platform/pricing, read 2026-11).
pub const WORKERS_USD_PER_MONTH: f64 = 5.0;
pub const WORKERS_INCLUDED_REQUESTS: f64 = 10_000_000.0;
pub const WORKERS_USD_PER_MILLION: f64 = 0.30;

/// Firestore, asia-northeast3: 0.18 USD per 100,000 document writes, 0.06 USD per 100,000
/// reads, beyond the free 20,000 writes and 50,000 reads a day
/// (cloud.google.com/firestore/pricing, read 2026-11).
pub const FIRESTORE_USD_PER_100K_WRITES: f64 = 0.18;
pub const FIRESTORE_USD_PER_100K_READS: f64 = 0.06;
pub const FIRESTORE_FREE_WRITES_PER_DAY: f64 = 20_000.0;
pub const FIRESTORE_FREE_READS_PER_DAY: f64 = 50_000.0;

/// Pub/Sub: 40 USD per TiB of throughput, first 10 GiB a month free, 1 KB minimum per request
/// (cloud.google.com/pubsub/pricing, read 2026-11). Job messages are small: this system's
/// volume stays inside the free tier, which the model checks.
pub const PUBSUB_FREE_GIB_PER_MONTH: f64 = 10.0;
pub const PUBSUB_USD_PER_TIB: f64 = 40.0;

/// A home workstation able to run the 3B model (RTX 4070-class GPU PC), about 2,000,000 KRW,
/// written off over 36 months (Korean retail prices, read 2026-11).
pub const WORKSTATION_KRW: f64 = 2_000_000.0;
pub const WORKSTATION_MONTHS: f64 = 36.0;
/// Its draw: 60 W idle, 300 W while generating; household electricity ≈ 250 KRW/kWh at the
/// usage tier such a machine pushes a home into (KEPCO residential tariff, read 2026-11).
pub const WORKSTATION_IDLE_WATTS: f64 = 60.0;
pub const WORKSTATION_BUSY_WATTS: f64 = 300.0;
pub const KRW_PER_KWH: f64 = 250.0;

/// API-only: a small hosted LLM at 0.15 USD per million input tokens and 0.60 USD per million
/// output tokens (OpenAI gpt-4o-mini list price, openai.com/api/pricing, read 2026-11).
pub const API_USD_PER_M_INPUT: f64 = 0.15;
pub const API_USD_PER_M_OUTPUT: f64 = 0.60;
