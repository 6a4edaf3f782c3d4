//! Where each durable consumer stands (`convctl checkpoints`, readiness).

use conv_nats::topology::Topology;
use serde::Serialize;

/// A consumer whose state could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{stream}/{consumer}: {source}")]
pub struct CollectError {
    pub stream: String,
    pub consumer: String,
    pub source: async_nats::jetstream::context::ConsumerInfoError,
}

/// One consumer's checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct Checkpoint {
    pub stream: String,
    pub consumer: String,
    /// Highest stream sequence below which everything is acked.
    pub ack_floor: u64,
    /// Highest stream sequence delivered.
    pub delivered: u64,
    /// Messages not yet delivered.
    pub pending: u64,
    /// Delivered but not yet acked.
    pub ack_pending: usize,
    /// Delivered more than once and not yet acked.
    pub redelivered: usize,
    /// False when the consumer does not exist (run `convctl setup`).
    pub exists: bool,
}

/// Reads every declared consumer's state.
pub async fn collect(js: &async_nats::jetstream::Context, topo: &Topology) -> Result<Vec<Checkpoint>, CollectError> {
    let mut out = Vec::new();
    for spec in &topo.consumers {
        let name = spec.config.durable_name.clone().unwrap_or_default();
        let missing = Checkpoint {
            stream: spec.stream.clone(),
            consumer: name.clone(),
            ack_floor: 0,
            delivered: 0,
            pending: 0,
            ack_pending: 0,
            redelivered: 0,
            exists: false,
        };
        let Ok(stream) = js.get_stream_no_info(&spec.stream).await else {
            out.push(missing);
            continue;
        };
        match stream.consumer_info(&name).await {
            Ok(info) => out.push(Checkpoint {
                ack_floor: info.ack_floor.stream_sequence,
                delivered: info.delivered.stream_sequence,
                pending: info.num_pending,
                ack_pending: info.num_ack_pending,
                redelivered: info.num_redelivered,
                exists: true,
                ..missing
            }),
            Err(e) if conv_nats::topology::consumer_not_found(&e.kind()) => out.push(missing),
            Err(e) => {
                return Err(CollectError { stream: spec.stream.clone(), consumer: name, source: e });
            }
        }
    }
    Ok(out)
}
