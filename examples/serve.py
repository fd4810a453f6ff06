#!/usr/bin/env python
"""Serve many tenants' CLIP-SVD adapters of one base model as image classifiers over HTTP.

    pip install "peft-svd[serve]"
    python examples/serve.py --adapters runs/            # built-in model, every adapter folder in runs/
    python examples/serve.py --model openai/clip-vit-base-patch16 --adapters adapters/ --lazy --port 8000
    python examples/serve.py --adapter shapes=runs/shapes-8shot --adapter pets=org/pets-svd-adapter

    curl -s localhost:8000/v1/classify -H 'content-type: application/json' \\
        -d "{\\"adapter\\": \\"shapes\\", \\"image\\": \\"$(base64 -w0 cat.png)\\"}"

Requests of any tenants that arrive within --max-wait-ms of each other run as one mixed-adapter
batch (up to --max-batch). Each tenant is an adapter saved by examples/fewshot.py, whose
results.json gives its class names and template. Adapters load at start, or with --lazy on their
first request (from the --adapters folder only), with the checks of `PeftModel.from_pretrained`.

Endpoints: POST /v1/classify `{"adapter": name, "image": base64 PNG/JPEG, "top_k": 5}` returns
`{"adapter", "label", "index", "top": [{"label", "probability"}], "batch_size"}`; GET /v1/adapters;
GET /v1/stats (batches run, their sizes, the text-feature cache); GET /health.
Errors: 404 unknown adapter, 413 image too large, 422 bad request or image, 500 an adapter that
cannot be loaded.
"""

import argparse
import asyncio
import base64
import binascii
import contextlib
import dataclasses
import logging
import os

from peft_svd_cli import params

BUILTIN_MODEL = "peft-svd/builtin"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=params.HelpFormatter)
    g = p.add_argument_group("model and adapters")
    params.add_model_args(g)
    p.set_defaults(model=BUILTIN_MODEL)
    g.add_argument("--adapters", default=None, help="A folder of adapter folders; each subfolder is a tenant named after it.")
    g.add_argument("--adapter", action="append", default=[], metavar="NAME=ADAPTER",
                   help="A tenant: its name and its adapter folder or Hub id (repeat for more).")
    g.add_argument("--lazy", action="store_true", help="Load the adapters of --adapters on their first request, not at start.")
    g = p.add_argument_group("serving")
    g.add_argument("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0 for every interface).")
    g.add_argument("--port", type=params.positive_int, default=8000, help="Port to listen on.")
    g.add_argument("--max-batch", type=params.positive_int, default=32, help="Most requests in one mixed batch.")
    g.add_argument("--max-wait-ms", type=params.non_negative_float, default=5.0,
                   help="How long a batch waits for more requests after its first one, in milliseconds.")
    g.add_argument("--max-cache-mb", type=params.non_negative_float, default=256.0,
                   help="Memory for the tenants' class-prompt features, in MiB (least recently used dropped beyond).")
    g.add_argument("--max-image-mb", type=params.positive_float, default=10.0, help="Largest image file accepted, in MiB.")
    g.add_argument("--device", default=None, help="Device to run on (default: cuda if available, else cpu).")
    params.add_threads_arg(g)
    args = p.parse_args(argv)
    tenants = {}
    for item in args.adapter:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            p.error(f"argument --adapter: expected NAME=ADAPTER, got {item!r}")
        if name in tenants:
            p.error(f"argument --adapter: tenant {name!r} given twice")
        tenants[name] = source
    args.tenants = tenants
    if args.lazy and args.adapters is None:
        p.error("--lazy loads adapters from the --adapters folder; give one")
    if args.adapters is not None and not os.path.isdir(args.adapters):
        p.error(f"argument --adapters: {args.adapters} is not a folder")
    return args


def build_app(classifier, *, max_batch: int, max_wait_ms: float, adapters_dir: str | None = None,
              lazy: bool = False, max_image_bytes: int = 10 * 2**20):
    """The FastAPI application around a `MultiAdapterClassifier` (see the module docstring)."""
    from fastapi import FastAPI, HTTPException
    from pydantic import BaseModel, Field

    from peft_svd import serving

    batcher = serving.RequestBatcher(classifier, max_batch=max_batch, max_wait_ms=max_wait_ms)
    loading = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="peft-svd adapter server", lifespan=lifespan)

    class ClassifyRequest(BaseModel):
        adapter: str = Field(description="The tenant's name.")
        image: str = Field(description="The image file (PNG, JPEG, ...), base64-encoded.")
        top_k: int = Field(5, ge=1, le=1000, description="How many of the most probable classes to return.")

    async def ensure_loaded(tenant: str) -> None:
        if tenant in classifier or not lazy:
            return
        path = os.path.join(adapters_dir, tenant)
        # the name rule of tenants keeps the path inside the folder ('.', '/' and '..' are refused)
        if not serving.valid_tenant_name(tenant) or not os.path.isfile(os.path.join(path, serving.ADAPTER_CONFIG)):
            return
        async with loading:
            if tenant not in classifier:
                try:
                    await asyncio.to_thread(classifier.load_adapter, tenant, path)
                except ValueError as exc:
                    logging.getLogger(__name__).error("adapter %s cannot be loaded: %s", path, exc)
                    raise HTTPException(500, f"adapter {tenant!r} cannot be loaded: {exc}") from exc

    @app.post("/v1/classify")
    async def classify(request: ClassifyRequest):
        await ensure_loaded(request.adapter)
        if request.adapter not in classifier:
            raise HTTPException(404, f"unknown adapter {request.adapter!r}; see GET /v1/adapters")
        if len(request.image) > 4 * (max_image_bytes + 2) // 3 + 4:
            raise HTTPException(413, f"the image is larger than {max_image_bytes / 2**20:g} MiB")
        try:
            data = base64.b64decode(request.image, validate=True)
            image = await asyncio.to_thread(serving.decode_image, data)
        except (binascii.Error, ValueError) as exc:
            raise HTTPException(422, f"image: {exc if isinstance(exc, serving.BadImageError) else 'not valid base64'}") from exc
        try:
            result = await batcher.classify(request.adapter, image)
        except serving.UnknownTenantError as exc:  # unloaded while the request waited
            raise HTTPException(404, exc.detail) from exc
        except serving.RequestError as exc:
            raise HTTPException(422, exc.detail) from exc
        return {
            "adapter": result.tenant,
            "label": result.label,
            "index": result.index,
            "top": [{"label": label, "probability": p} for label, p in result.top(request.top_k)],
            "batch_size": result.batch_size,
        }

    @app.get("/v1/adapters")
    async def adapters():
        listed = [
            {"name": t.name, "classes": list(t.class_names), "template": t.template, "source": t.source}
            for t in classifier.tenants.values()
        ]
        return {"adapters": listed, "lazy": lazy}

    @app.get("/v1/stats")
    async def stats():
        return {**batcher.stats.to_dict(), "text_feature_cache": dataclasses.asdict(classifier.cache_info())}

    @app.get("/health")
    async def health():
        return {"status": "ok", "adapters": len(classifier.tenants)}

    return app


def load_classifier(args):
    """The classifier with the adapters to load at start; an expected failure ends the script with
    `error: <message>`."""
    import torch

    from peft_svd import serving
    from peft_svd.fewshot import models

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cpu"):
        torch.set_num_threads(args.threads or params.default_threads(1, os.cpu_count()))
    try:
        encoder = models.load_dual_encoder(args.model, pretrained=args.pretrained)
        classifier = serving.MultiAdapterClassifier(encoder, device=device, max_cache_mb=args.max_cache_mb)
        if args.adapters is not None and not args.lazy:
            classifier.load_adapters_from(args.adapters)
        for tenant, source in args.tenants.items():
            classifier.load_adapter(tenant, source)
    except (ValueError, ImportError, OSError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    if not classifier.tenants and not args.lazy:
        raise SystemExit("error: no adapters to serve; give --adapters FOLDER or --adapter NAME=ADAPTER")
    return classifier


def main(argv=None):
    args = parse_args(argv)  # every flag is checked before anything heavy is imported
    try:
        import uvicorn
    except ImportError as exc:
        raise SystemExit(f'error: the server needs FastAPI and uvicorn: pip install "peft-svd[serve]" ({exc})') from exc
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    classifier = load_classifier(args)
    app = build_app(classifier, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, adapters_dir=args.adapters,
                    lazy=args.lazy, max_image_bytes=int(args.max_image_mb * 2**20))
    tenants = ", ".join(sorted(classifier.tenants)) or "none yet (--lazy)"
    print(f"serving {args.model} with adapters: {tenants}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
