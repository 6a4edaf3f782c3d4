"""A CloudEvents producer that is not conv: the Python `cloudevents` SDK's
binary mode (ce- headers) published with `nats-py` straight to JetStream.

Usage: python3 publish_cloudevents.py NATS_URL CONVERSATION_ID
Prints one JSON line per publish: {"id", "subject", "stream", "seq"}.
"""

import asyncio
import json
import sys

import nats
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent

TIME = "2026-01-01T00:00:00Z"


def event(event_id, subject, text):
    attributes = {
        "id": event_id,
        "type": "conv.in.message.received",
        "source": "/py client",
        "subject": subject,
        "time": TIME,
        "causationid": "cause-1",
        "datacontenttype": "application/json",
    }
    return CloudEvent(attributes, {"text": text, "channel": "python"})


async def main(url, conversation):
    nc = await nats.connect(url)
    js = nc.jetstream()
    events = [
        event("py-valid", conversation, 'héllo "world" 100%'),
        # Invalid: a conversation id with a space. Terminated at consumption.
        event("py-invalid", "bad subject", "never applied"),
        event("py-valid-2", conversation, "still flowing"),
    ]
    for e in events:
        headers, body = to_binary(e)
        # The SDK names the media type `content-type` in binary mode already;
        # NATS headers take it as is.
        subject = f"conv.in.message.{conversation}"
        ack = await js.publish(subject, body, headers=dict(headers))
        print(json.dumps({"id": e["id"], "subject": subject, "stream": ack.stream, "seq": ack.seq}))
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
