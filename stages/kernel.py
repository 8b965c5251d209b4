"""`make kernel` / `make kernel-push`: the offline Kaggle kernel running `make submit`.

python -m stages.kernel build --config configs/demo_ensemble.yaml [--set key=value ...] [--user NAME] [--out build/kaggle]
python -m stages.kernel push [--user NAME] [--out build/kaggle]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.datasets import get_dataset, load_config
from pipeline.kaggle.bundle import DEFAULT_OUT, DEFAULT_PREFIX, BundleError, build_bundle, resolve_user
from pipeline.kaggle.push import PushError, push_bundle
from pipeline.kaggle.wheels import DEFAULT_CACHE, WheelError
from pipeline.runtime import configure_runtime
from stages._cli import run_cli

log = logging.getLogger("stages.kernel")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="assemble the datasets and the kernel under --out")
    build.add_argument("--config", default="configs/demo_ensemble.yaml", help="ensemble config")
    build.add_argument(
        "--set", nargs="*", default=[], help="overrides key=value, as `make submit` takes them"
    )
    build.add_argument("--prefix", default=DEFAULT_PREFIX, help="slug prefix of the datasets and kernel")
    build.add_argument("--wheels-from", type=Path, help="take the wheels from this folder, download nothing")
    build.add_argument(
        "--wheels-cache", type=Path, default=DEFAULT_CACHE, help="where downloaded wheels stay"
    )
    build.add_argument(
        "--debug-train-volumes",
        type=int,
        default=0,
        help="the kernel predicts N train volumes instead of test",
    )
    push = sub.add_parser("push", help="upload the built datasets and kernel with the kaggle CLI")
    push.add_argument("--message", help="dataset version notes (default: the build id)")
    push.add_argument("--no-wait", action="store_true", help="push the kernel without waiting for datasets")
    for p in (build, push):
        p.add_argument(
            "--user", help="Kaggle user name (default: $KAGGLE_USER, $KAGGLE_USERNAME, kaggle.json)"
        )
        p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="bundle folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    configure_runtime()
    user = resolve_user(args.user)
    try:
        if args.command == "push":
            commands = push_bundle(
                args.out, user, args.message, wait_timeout=None if args.no_wait else 1800.0
            )
            log.info("pushed %d datasets and the kernel from %s", len(commands) - 1, args.out)
            return args.out
        cfg = load_config(args.config, args.set, stage="ensemble")
        bundle = build_bundle(
            cfg,
            get_dataset(cfg.dataset),
            args.out,
            user=user,
            prefix=args.prefix,
            wheels_from=args.wheels_from,
            wheels_cache=args.wheels_cache,
            debug_train_volumes=args.debug_train_volumes,
        )
    except (BundleError, PushError, WheelError) as exc:
        raise SystemExit(f"stages.kernel {args.command}: {exc}") from None
    sizes = ", ".join(f"{part} {size / 2**20:.1f} MiB" for part, size in bundle.sizes().items())
    log.info("wrote %s (build %s, owner %s): %s", bundle.root, bundle.build_id, bundle.names.user, sizes)
    return bundle.root


if __name__ == "__main__":
    raise SystemExit(run_cli("kernel", main))
