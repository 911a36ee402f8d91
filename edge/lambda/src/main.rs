//! `edge-lambda`: the edge as an AWS Lambda function (Function URL or API Gateway).
//! Configuration: the same variables as the Worker (see the README), from the environment.

use std::sync::Arc;

use edge_core::{App, Config};
use edge_lambda::{Native, handle, runtime_env_problem};

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    // The runtime client panics without Lambda's variables; say what this binary is instead.
    if let Some(problem) = runtime_env_problem(|k| std::env::var(k).ok()) {
        eprintln!("edge-lambda: {problem}");
        std::process::exit(2);
    }
    let app = Arc::new(App::new(Config::from_env(|k| std::env::var(k).ok())));
    let platform = Native::new();
    lambda_http::run(lambda_http::service_fn(move |event| {
        handle(app.clone(), platform.clone(), event)
    }))
    .await
}
