//! A server on the shipped test model and a small blocking HTTP client for the tests.

#![allow(dead_code)]

use burn::backend::NdArray;
use serde_json::Value;
use serve::{ServeOptions, Server};

pub type Cpu = NdArray<f32>;

pub const MODEL: &str = "smollm2";

/// A server on a free port serving the shipped test model as [`MODEL`].
pub fn start(queue_capacity: usize) -> Server {
    start_with(queue_capacity, ServeOptions::new(MODEL).max_batch)
}

/// [`start`], running at most `max_batch` requests at once.
pub fn start_with(queue_capacity: usize, max_batch: usize) -> Server {
    start_opts(ServeOptions {
        queue_capacity,
        max_batch,
        ..ServeOptions::new(MODEL)
    })
}

/// A server of the shipped test model with `opts`, on a free port.
pub fn start_opts(opts: ServeOptions) -> Server {
    let path = test_assets::smollm2_gguf().expect("the test model can be fetched");
    let model = model_llama::open_model(&path).unwrap();
    let opts = ServeOptions { port: 0, ..opts };
    Server::start::<Cpu>(&model, &Default::default(), &opts).unwrap()
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// POSTs `body` (sent as is, so it may be broken JSON); returns the status and JSON answer.
pub fn post(server: &Server, path: &str, body: &str) -> (u16, Value) {
    let mut r = agent()
        .post(format!("http://{}{path}", server.addr()))
        .header("content-type", "application/json")
        .send(body)
        .unwrap();
    let status = r.status().as_u16();
    (status, r.body_mut().read_json().unwrap())
}

pub fn get(server: &Server, path: &str) -> (u16, Value) {
    let mut r = agent()
        .get(format!("http://{}{path}", server.addr()))
        .call()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.body_mut().read_json().unwrap())
}

/// A greedy completion's text.
pub fn greedy(server: &Server, prompt: &str, max_tokens: usize) -> String {
    let body = serde_json::json!({
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
    });
    let (status, v) = post(server, "/v1/completions", &body.to_string());
    assert_eq!(status, 200, "{v}");
    v["choices"][0]["text"].as_str().unwrap().to_string()
}
