"""ClientApp: answers a training message at once with a small delta of the received tensors' shapes."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    received = msg.content["arrays"].to_numpy_ndarrays()
    rng = np.random.default_rng()
    # np.asarray: arithmetic on a 0-d array (a BN counter) gives a numpy scalar, which ArrayRecord refuses.
    answer = [
        np.asarray(a + rng.standard_normal(a.shape) * 1e-3, dtype=a.dtype)
        if a.dtype.kind == "f"
        else np.asarray(a)
        for a in received
    ]
    content = RecordDict({"arrays": ArrayRecord(answer), "metrics": MetricRecord({"num-examples": 100})})
    return Message(content=content, reply_to=msg)
