"""What a federated run reports: detection scores, console lines, TensorBoard scalars and
summary figures, all computed from the per-round rows of metrics.jsonl."""

from __future__ import annotations

from typing import Any

from torch import nn

from backdoors.hooks import Hook, pct


def detection(flagged: list[bool], attackers: list[bool]) -> dict[str, Any]:
    """Counts and scores of an aggregator's flags against the known attackers. precision is
    None when nothing was flagged, recall None when no attacker took part."""
    tp = sum(f and a for f, a in zip(flagged, attackers, strict=True))
    fp = sum(f and not a for f, a in zip(flagged, attackers, strict=True))
    fn = sum(a and not f for f, a in zip(flagged, attackers, strict=True))
    return {"true_positives": tp, "false_positives": fp, "false_negatives": fn,
            "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None}


def totals(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Detection pooled over rounds (None for aggregators that never flag)."""
    scored = [r["detection"] for r in rows if r.get("detection") is not None]
    if not scored:
        return None
    tp, fp, fn = (sum(d[k] for d in scored)
                  for k in ("true_positives", "false_positives", "false_negatives"))
    return {"true_positives": tp, "false_positives": fp, "false_negatives": fn,
            "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None}


def summary_figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Final figures of the last round plus the run's extremes and costs."""
    last = rows[-1]
    keys = ("clean_accuracy", "asr", "backdoor_accuracy", "robust_accuracy", "clean_loss",
            "backdoor_loss")
    attacked = [r for r in rows if r["attackers"]]
    return {
        **{k: last[k] for k in keys if k in last},
        "rounds": last["round"],
        "best_clean_accuracy": max(r["clean_accuracy"] for r in rows),
        "max_asr": max((r["asr"] for r in rows if r["asr"] == r["asr"]), default=None),
        "attack_rounds": [r["round"] for r in attacked],
        "asr_after_first_attack": attacked[0]["asr"] if attacked else None,
        **durability(rows),
        "detection": totals(rows),
        "seconds_per_round": sum(r["round_seconds"] for r in rows) / len(rows),
        "client_seconds_per_round": sum(r["train_seconds"] for r in rows) / len(rows),
    }


def durability(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How long the backdoor lasts once the attack stops: the ASR of every round after the
    last attacked one (its index is rounds since the attack), and at 1, 5, 10 and 20
    rounds after it where the run went that far."""
    attacked = [r["round"] for r in rows if r["attackers"]]
    if not attacked:
        return {"last_attack_round": None, "asr_since_attack": []}
    last = attacked[-1]
    curve = [r["asr"] for r in rows if r["round"] > last]
    return {"last_attack_round": last, "asr_since_attack": curve,
            **{f"asr_{k}_rounds_after": curve[k - 1] for k in (1, 5, 10, 20)
               if len(curve) >= k}}


def round_line(row: dict[str, Any], last_round: int) -> str:
    """One readable line per round."""
    norms = row["update_norms"]
    text = (f"round {row['round']}/{last_round}  clients {len(row['participants'])} "
            f"(attackers {len(row['attackers'])})  |  clean {pct(row['clean_accuracy'])}  "
            f"ASR {pct(row['asr'])}  |  update norm mean {sum(norms) / len(norms):.3g} "
            f"max {max(norms):.3g}")
    det = row.get("detection")
    if det is not None:
        flagged = det["true_positives"] + det["false_positives"]
        text += (f"  flagged {flagged} (precision {pct(det['precision'])}, "
                 f"recall {pct(det['recall'])})")
    return text + f"  |  {row['round_seconds']:.1f}s"


class RoundConsole(Hook):
    """Prints `round_line` after each round."""

    def __init__(self, last_round: int) -> None:
        self.last_round = last_round

    def on_epoch_end(self, epoch: int, row: dict[str, Any], model: nn.Module) -> None:
        print(round_line(row, self.last_round), flush=True)


def federated_scalars(row: dict[str, Any]) -> dict[str, float]:
    """The Federated/* TensorBoard scalars of a round row."""
    norms = row["update_norms"]
    attackers = set(row["attackers"])
    values = {"update_norm_mean": sum(norms) / len(norms), "update_norm_max": max(norms),
              "round_seconds": row["round_seconds"], "client_seconds": row["train_seconds"]}
    bad = [n for p, n in zip(row["participants"], norms, strict=True) if p in attackers]
    if bad:
        values["attacker_update_norm"] = max(bad)
    det = row.get("detection")
    if det is not None:
        values["flagged"] = det["true_positives"] + det["false_positives"]
        values.update({k: det[k] for k in ("precision", "recall") if det[k] is not None})
    return values
