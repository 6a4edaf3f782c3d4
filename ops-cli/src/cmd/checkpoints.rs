//! `convctl checkpoints`: where each durable consumer stands.

use conv_admin::checkpoints::collect;
use conv_nats::topology::Topology;

use crate::cli::{Global, TopologyArgs};
use crate::{Error, Outcome};

pub async fn run(g: &Global, topology: &TopologyArgs) -> Result<Outcome, Error> {
    let topo = Topology::declare(&topology.topology()?);
    let js = crate::connect(g).await?;
    let checkpoints = collect(&js, &topo).await.map_err(Error::js("the consumers' state"))?;
    if g.json {
        return Ok(Outcome::ok(crate::to_json(&checkpoints)));
    }
    // Columns as wide as their widest name, so long consumer names line up.
    let sw = checkpoints.iter().map(|c| c.stream.len()).max().unwrap_or(0).max("STREAM".len());
    let cw = checkpoints.iter().map(|c| c.consumer.len()).max().unwrap_or(0).max("CONSUMER".len());
    let mut text = format!(
        "{:<sw$} {:<cw$} {:>10} {:>10} {:>10} {:>11} {:>11}\n",
        "STREAM", "CONSUMER", "ACK FLOOR", "DELIVERED", "PENDING", "ACK PENDING", "REDELIVERED"
    );
    for c in &checkpoints {
        if c.exists {
            text.push_str(&format!(
                "{:<sw$} {:<cw$} {:>10} {:>10} {:>10} {:>11} {:>11}\n",
                c.stream, c.consumer, c.ack_floor, c.delivered, c.pending, c.ack_pending, c.redelivered
            ));
        } else {
            text.push_str(&format!("{:<sw$} {:<cw$} missing (run `convctl setup`)\n", c.stream, c.consumer));
        }
    }
    Ok(Outcome::ok(text.trim_end()))
}
