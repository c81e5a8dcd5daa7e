"""Per-reply checks run before a LoRA strategy aggregates a training round.

Flower's ``FedAvg`` validates the replies as a group
(``validate_message_reply_consistency``) and raises ``InconsistentMessageReplies``,
which ends the run, as soon as one reply disagrees with the others. A single broken
or hostile client must not stop a round, so each reply is judged on its own
against the arrays the server sent, and the bad ones are dropped with a warning
that names the node and the reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.supercore import log

_A, _B = ".lora_A.", ".lora_B."


def lora_partner(key: str) -> str | None:
    """Return the key of the other LoRA factor (``lora_A`` <-> ``lora_B``), or None."""
    if _A in key:
        return key.replace(_A, _B)
    if _B in key:
        return key.replace(_B, _A)
    return None


def is_lora_a(key: str) -> bool:
    """Whether ``key`` names a LoRA down-projection ``A`` (shape ``[r, in]``)."""
    return _A in key


def arrayrecord_nbytes(record: ArrayRecord) -> int:
    """Return the sum of the NumPy ``nbytes`` of the arrays in ``record``."""
    return sum(int(array.numpy().nbytes) for array in record.values())


def valid_train_replies(
    replies: Iterable[Message],
    reference: ArrayRecord,
    *,
    rank_flexible: bool = False,
    max_bytes: int | None = None,
    weight_key: str = "num-examples",
    modules_flexible: bool = False,
) -> list[Message]:
    """Return the training replies that are safe to aggregate; log the others.

    Parameters
    ----------
    replies : Iterable[Message]
        The replies of one training round.
    reference : ArrayRecord
        The arrays the server sent; every reply must have the same keys and shapes.
    rank_flexible : bool (default: False)
        Let each client use its own LoRA rank: ``lora_A`` may differ from the
        reference in dim 0 and ``lora_B`` in dim 1, as long as a module's A and B
        agree on the rank.
    max_bytes : int | None (default: None)
        Drop replies whose arrays take more than this many bytes.
    weight_key : str (default: "num-examples")
        The MetricRecord entry used as the aggregation weight.
    modules_flexible : bool (default: False)
        Let a reply leave out whole LoRA modules (both factors) it does not hold, e.g.
        the LAM encoder layers a compressed client dropped; every other key must be there.
    """
    valid = []
    for msg in replies:
        reason = _problem(msg, reference, rank_flexible, max_bytes, weight_key,
                          modules_flexible)
        if reason is None:
            valid.append(msg)
        else:
            _drop(msg, reason)
    return _with_common_metric_keys(valid)


def _drop(msg: Message, reason: str) -> None:
    log(WARNING, "Dropping the reply of node %s: %s", msg.metadata.src_node_id, reason)


# pylint: disable-next=too-many-return-statements
def _problem(
    msg: Message,
    reference: ArrayRecord,
    rank_flexible: bool,
    max_bytes: int | None,
    weight_key: str,
    modules_flexible: bool = False,
) -> str | None:
    """Return why ``msg`` cannot be aggregated, or None if it can."""
    if msg.has_error():
        return f"the client failed (error code {msg.error.code}): {msg.error.reason}"
    if not msg.has_content():
        return "the reply carries neither content nor an error"
    content = msg.content
    n_arrays, n_metrics = len(content.array_records), len(content.metric_records)
    if (n_arrays, n_metrics) != (1, 1):
        return (
            "expected exactly one ArrayRecord and one MetricRecord, "
            f"got {n_arrays} and {n_metrics}"
        )
    (record,) = content.array_records.values()
    (metrics,) = content.metric_records.values()

    weight = metrics.get(weight_key)
    # `not weight > 0` also rejects NaN; a bool is an int but never a count.
    is_number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
    if not is_number or not weight > 0:
        return f"'{weight_key}' must be a positive number, got {weight!r}"

    missing = sorted(reference.keys() - record.keys())
    unexpected = sorted(record.keys() - reference.keys())
    if modules_flexible and not unexpected and record:
        # Whole modules may be absent: a missing key whose partner is absent too.
        missing = [k for k in missing if lora_partner(k) is None
                   or lora_partner(k) in record or lora_partner(k) not in reference]
    if missing or unexpected:
        return (
            "its keys differ from the arrays sent: "
            f"{len(missing)} missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}"
        )

    arrays = {}
    for key, array in record.items():
        try:
            arrays[key] = array.numpy()
        except (TypeError, ValueError, OSError) as err:
            return f"'{key}' cannot be decoded as a NumPy array ({err})"

    nbytes = sum(a.nbytes for a in arrays.values())
    if max_bytes is not None and nbytes > max_bytes:
        return f"its arrays take {nbytes} bytes, more than the limit of {max_bytes}"

    for key, arr in arrays.items():
        expected = tuple(reference[key].shape)
        if rank_flexible and lora_partner(key) in arrays:
            if reason := _rank_flexible_shape_problem(key, arrays, expected):
                return reason
        elif arr.shape != expected:
            return f"'{key}' has shape {arr.shape}, expected {expected}"
        # A float64 reply would silently turn the global arrays into float64.
        if arr.dtype != np.dtype(reference[key].dtype):
            return f"'{key}' has dtype {arr.dtype}, expected {reference[key].dtype}"
        if not np.isfinite(arr).all():
            return f"'{key}' contains NaN or Inf"
    return None


def _rank_flexible_shape_problem(
    key: str, arrays: dict[str, np.ndarray], expected: tuple[int, ...]
) -> str | None:
    """Shape check of one LoRA factor that lets the rank differ from the reference."""
    shape = arrays[key].shape
    # A is [r, in] and B is [out, r] (conv LoRA adds trailing kernel dims).
    rank_dim = 0 if is_lora_a(key) else 1
    others_match = len(shape) == len(expected) and all(
        shape[d] == expected[d] for d in range(len(shape)) if d != rank_dim
    )
    if not others_match:
        return (
            f"'{key}' has shape {shape}, expected {expected} "
            f"(any rank in dim {rank_dim})"
        )
    partner = lora_partner(key)
    partner_shape = arrays[partner].shape
    partner_rank = partner_shape[1 - rank_dim] if len(partner_shape) > 1 else None
    if shape[rank_dim] < 1 or shape[rank_dim] != partner_rank:
        return (
            f"'{key}' has rank {shape[rank_dim]} but '{partner}' has shape "
            f"{partner_shape}; a module's A and B must share one rank >= 1"
        )
    return None


def _with_common_metric_keys(replies: list[Message]) -> list[Message]:
    """Keep the replies whose MetricRecord has the most common set of keys.

    Flower averages metrics key by key and raises if the replies' key sets differ.
    """
    def keys(msg: Message) -> frozenset[str]:
        return frozenset(next(iter(msg.content.metric_records.values())).keys())

    if not replies:
        return replies
    common = Counter(keys(m) for m in replies).most_common(1)[0][0]
    for msg in replies:
        if keys(msg) != common:
            _drop(
                msg,
                f"its metric keys {sorted(keys(msg))} differ from those of the "
                f"other replies {sorted(common)}",
            )
    return [m for m in replies if keys(m) == common]
