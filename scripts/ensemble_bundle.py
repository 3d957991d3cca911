"""Make a mean-ensemble bundle from a base bundle's weights and further checkpoints.

    .venv/bin/python scripts/ensemble_bundle.py --base models/bundles/hpb_demo \\
        --member var/model/ft2/last.pt --out var/model/ens --version 0.3.0 \\
        [--postprocess '{"lesion_seed_threshold": 0.6}']

Every member must have the base bundle's network definition (a
``models.train`` checkpoint, or a bundle's ``models/model.pt``). The base may
itself be an ensemble: its members come first (``--keep-base-members 0`` keeps
only member 0; default all), and every member must have their definition. The
output is a copy of the base bundle whose ``network_def`` is
``hpb.MeanEnsemble`` of the members (the base's weights first), whose one weights file holds all members
(``members.<i>.<key>``), with the weights hash, version and, if given, the
declared post-processing updated. The model card (docs/README.md) and the
metadata's training notes are the caller's to update.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.bundle import load_bundle, sha256_file  # noqa: E402
from models.network import ENSEMBLE_TARGET, MeanEnsemble, ensemble_network_def  # noqa: E402


def _state(path: Path) -> dict[str, torch.Tensor]:
    state: Any = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise SystemExit(f"{path}: not a state dict or a models.train checkpoint")
    return state


def _base_members(
    network_def: dict[str, Any], state: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], list[dict[str, torch.Tensor]]]:
    """The base's member definition and its members' weights (itself, if not an ensemble)."""
    if network_def.get("_target_") != ENSEMBLE_TARGET:
        return network_def, [state]
    defs = network_def["members"]
    if any(d != defs[0] for d in defs):
        raise SystemExit("the base ensemble's members have different definitions")
    return dict(defs[0]), [MeanEnsemble.member_state(state, i) for i in range(len(defs))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--member", type=Path, action="append", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--version", required=True)
    ap.add_argument("--postprocess", default=None, help="JSON object merged into the declared one")
    ap.add_argument(
        "--keep-base-members",
        default=None,
        metavar="I,J",
        help="with an ensemble base: which of its members to keep (default all)",
    )
    args = ap.parse_args()
    base = load_bundle(args.base)
    member_def, base_states = _base_members(base.network_def, _state(base.weights_path))
    if args.keep_base_members is not None:
        keep = [int(i) for i in args.keep_base_members.split(",")]
        if any(not 0 <= i < len(base_states) for i in keep):
            raise SystemExit(f"--keep-base-members {keep}: the base has {len(base_states)}")
        base_states = [base_states[i] for i in keep]
    states = base_states + [_state(p) for p in args.member]
    merged = {f"members.{i}.{k}": v for i, s in enumerate(states) for k, v in s.items()}
    if args.out.exists():
        shutil.rmtree(args.out)
    shutil.copytree(args.base, args.out)
    infer_path = args.out / "configs" / "inference.json"
    infer = json.loads(infer_path.read_text())
    infer["network_def"] = ensemble_network_def([member_def] * len(states))
    infer_path.write_text(json.dumps(infer, indent=2) + "\n")
    weights = args.out / "models" / "model.pt"
    torch.save(merged, weights)
    meta_path = args.out / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["version"] = args.version
    meta["hpb_node"]["weights_sha256"] = sha256_file(weights)
    if args.postprocess:
        meta["hpb_node"]["postprocess"] = {
            **meta["hpb_node"].get("postprocess", {}),
            **json.loads(args.postprocess),
        }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    bundle = load_bundle(args.out)  # the contract check, and the members load
    bundle.network()
    print(f"wrote {args.out}: {len(states)} members, version {args.version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
