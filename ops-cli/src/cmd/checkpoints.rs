//! `convctl checkpoints`: where each durable consumer stands.

use conv_nats::topology::Topology;
use serde::Serialize;

use crate::cli::Global;
use crate::{Error, Outcome};

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
pub async fn collect(js: &async_nats::jetstream::Context, topo: &Topology) -> Result<Vec<Checkpoint>, Error> {
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
            Err(e) => return Err(Error::JetStream(format!("{}/{name}: {e}", spec.stream))),
        }
    }
    Ok(out)
}

pub async fn run(g: &Global) -> Result<Outcome, Error> {
    let topo = Topology::declare(&g.topology()?);
    let js = crate::connect(g).await?;
    let checkpoints = collect(&js, &topo).await?;
    if g.json {
        return Ok(Outcome::ok(crate::to_json(&checkpoints)));
    }
    let mut text = format!(
        "{:<12} {:<14} {:>10} {:>10} {:>10} {:>11} {:>11}\n",
        "STREAM", "CONSUMER", "ACK FLOOR", "DELIVERED", "PENDING", "ACK PENDING", "REDELIVERED"
    );
    for c in &checkpoints {
        if c.exists {
            text.push_str(&format!(
                "{:<12} {:<14} {:>10} {:>10} {:>10} {:>11} {:>11}\n",
                c.stream, c.consumer, c.ack_floor, c.delivered, c.pending, c.ack_pending, c.redelivered
            ));
        } else {
            text.push_str(&format!("{:<12} {:<14} missing (run `convctl setup`)\n", c.stream, c.consumer));
        }
    }
    Ok(Outcome::ok(text.trim_end()))
}
