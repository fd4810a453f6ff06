"""Serving many adapters of one base model: `peft_svd.serving` and `examples/serve.py`.

Every answer is compared with the adapter loaded alone on a fresh base model
(`PeftModel.from_pretrained`, `zero_shot_head`, `encode_images`): probabilities within 1e-5
(float32; the mixed batch and the single adapter build the same adapted weights, in another order).
"""

import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

import peft_svd
from peft_svd import SVDConfig, iter_svd_layers, serving
from peft_svd.fewshot import models
from peft_svd.fewshot.record import RunRecord, RunSummary, TrainingRecord
from peft_svd.fewshot.zeroshot import encode_images, logit_scale, zero_shot_head
from tiny_models import randomize_deltas

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fewshot"))
from tiny_fewshot import write_tiny_clip  # noqa: E402

ATOL = 1e-5
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VISION_ONLY = r".*vision_model.*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)"
# tenant: (classes recorded in results.json, template, seed of its singular-value changes, target modules)
TENANTS = {
    "alpha": (["red", "green", "blue"], "a photo of a {}.", 1, None),
    "beta": (["cat", "dog", "car", "ship"], "a picture of the {}.", 2, None),
    "gamma": (["bird", "plane", "white"], "{} texture.", 3, VISION_ONLY),
}


def write_results(folder, class_names, template):
    """A results.json as examples/fewshot.py writes it (the fields the classifier reads are real)."""
    run = RunRecord(model="tiny", dataset="colors", class_names=class_names, train_split="train", protocol="few-shot",
                    shots=1, seed=1, template=template, num_steps=1, train_images=len(class_names), recipe={},
                    mixed_precision="no")
    training = TrainingRecord(steps=1, resumed_from_step=0, final_loss=0.0, mean_loss=0.0, wall_time_s=0.0,
                              num_processes=1, mixed_precision="no")
    summary = RunSummary(run=run, dataset_name="colors", num_classes=len(class_names), classes_trained=len(class_names),
                         model_library="transformers", test_split="test", trainable_parameters=1, total_parameters=1,
                         training=training)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(summary.to_dict(), f)


def save_adapter(path, base_dir, seed, target_modules=None, base_seed=None):
    """Saves an SVD adapter of the tiny CLIP at `base_dir` (or of one built with `base_seed`) with
    seeded singular-value changes."""
    if base_seed is None:
        model = models.load_dual_encoder(base_dir).model
    else:
        path_other = f"{path}-base"
        model = models.load_dual_encoder(write_tiny_clip(path_other, seed=base_seed)).model
    config = SVDConfig() if target_modules is None else SVDConfig(target_modules=target_modules)
    peft_model = models.adapt(model, config)
    randomize_deltas(peft_model, seed=seed)
    peft_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_clip(str(tmp_path_factory.mktemp("tiny-clip")))


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, clip_dir):
    root = tmp_path_factory.mktemp("adapters")
    for name, (classes, template, seed, targets) in TENANTS.items():
        path = save_adapter(str(root / name), clip_dir, seed, targets)
        write_results(path, classes, template)
    return str(root)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(6):
        pixels = (torch.rand(24 + 3 * i, 40 - 2 * i, 3, generator=g) * 255).to(torch.uint8).numpy()
        out.append(Image.fromarray(pixels))
    return out


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def reference(clip_dir, adapters_dir, images):
    """`reference(tenant, i)`: class probabilities of image i with the tenant's adapter loaded alone."""
    cache = {}

    def alone(tenant):
        if tenant not in cache:
            classes, template, _, _ = TENANTS[tenant]
            encoder = models.load_dual_encoder(clip_dir)
            model = models.load_adapter(encoder.model, os.path.join(adapters_dir, tenant)).eval()
            with torch.no_grad():
                head = zero_shot_head(model, encoder.tokenizer, classes, template)
                pixels = encoder.image_processor(images=images, return_tensors="pt")["pixel_values"]
                probabilities = (logit_scale(model) * encode_images(model, pixels) @ head.T).softmax(-1)
            cache[tenant] = (head, probabilities)
        return cache[tenant]

    return alone


@pytest.fixture
def classifier(clip_dir, adapters_dir):
    return serving.MultiAdapterClassifier.from_pretrained(clip_dir, adapters_dir)


def mixed_requests(images):
    names = list(TENANTS)
    return [(names[i % len(names)], i) for i in range(len(images))] + [(names[(i + 1) % 3], i) for i in range(3)]


def test_one_mixed_batch_equals_each_adapter_alone(classifier, images, reference):
    requests = mixed_requests(images)
    results = classifier.classify([(tenant, images[i]) for tenant, i in requests])
    assert len(results) == len(requests)
    for (tenant, i), result in zip(requests, results, strict=True):
        expected = reference(tenant)[1][i]
        assert result.tenant == tenant and result.batch_size == len(requests)
        assert result.class_names == tuple(TENANTS[tenant][0])
        torch.testing.assert_close(result.probabilities, expected, atol=ATOL, rtol=0)
        assert result.index == int(expected.argmax()) and result.label == TENANTS[tenant][0][result.index]
        assert result.top(2)[0] == (result.label, pytest.approx(float(expected.max()), abs=ATOL))
    # the answers differ between tenants for the same image: each request used its own adapter
    alpha_as_beta = classifier.classify([("beta", images[0])])[0]
    assert alpha_as_beta.class_names != results[0].class_names


def test_one_image_forward_per_batch(classifier, images, monkeypatch):
    calls = []
    original = serving.encode_images
    monkeypatch.setattr(serving, "encode_images", lambda model, x: calls.append(len(x)) or original(model, x))
    classifier.classify([(t, images[i]) for t, i in mixed_requests(images)])
    assert calls == [len(mixed_requests(images))]


def test_images_as_bytes_and_pixel_values(classifier, images, reference, clip_dir):
    processor = models.load_dual_encoder(clip_dir).image_processor
    pixels = processor(images=images[1], return_tensors="pt")["pixel_values"][0]
    results = classifier.classify([("alpha", png_bytes(images[0])), ("beta", pixels)])
    torch.testing.assert_close(results[0].probabilities, reference("alpha")[1][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(results[1].probabilities, reference("beta")[1][1], atol=ATOL, rtol=0)


def test_text_features_come_from_the_tenant_adapter(classifier, clip_dir, reference):
    encoder = models.load_dual_encoder(clip_dir)
    for tenant, (classes, template, _, _) in TENANTS.items():
        head = classifier.text_head(tenant)
        torch.testing.assert_close(head, reference(tenant)[0], atol=ATOL, rtol=0)
        base_head = zero_shot_head(encoder.model, encoder.tokenizer, classes, template)
        if tenant == "gamma":  # adapts the image tower only: its prompts are the base model's
            torch.testing.assert_close(head, base_head, atol=ATOL, rtol=0)
        else:
            assert (head - base_head).abs().max() > 1e-3


def text_layer(classifier, tenant):
    name = classifier.tenants[tenant].adapter_name
    return next(layer for n, layer in iter_svd_layers(classifier.model) if "text_model" in n and name in layer.svd_delta)


def test_cache_hits_and_invalidation(classifier, images):
    requests = [("alpha", images[0]), ("beta", images[1]), ("gamma", images[2])]
    classifier.classify(requests)
    info = classifier.cache_info()
    assert (info.hits, info.misses, info.entries) == (0, 3, 3)
    first = classifier.classify(requests)
    info = classifier.cache_info()
    assert (info.hits, info.misses) == (3, 3)

    # an in-place edit of alpha's change on a text layer: alpha's features are recomputed, the others kept
    with torch.no_grad():
        text_layer(classifier, "alpha").svd_delta[classifier.tenants["alpha"].adapter_name].mul_(3.0)
    edited = classifier.classify(requests)
    info = classifier.cache_info()
    assert (info.hits, info.misses, info.invalidations) == (5, 4, 1)
    assert not torch.allclose(edited[0].probabilities, first[0].probabilities, atol=1e-4)
    torch.testing.assert_close(edited[1].probabilities, first[1].probabilities)
    recomputed = classifier.text_head("alpha")
    classifier.clear_cache()
    torch.testing.assert_close(classifier.text_head("alpha"), recomputed)

    # an edit on the image tower does not touch the text features
    before = classifier.cache_info()
    vision = next(layer for n, layer in iter_svd_layers(classifier.model) if "vision_model" in n)
    with torch.no_grad():
        vision.svd_delta[classifier.tenants["alpha"].adapter_name].add_(0.1)
    classifier.text_head("alpha")
    assert classifier.cache_info().hits == before.hits + 1

    # a parameter replaced by another object, and an unload, invalidate too
    name = classifier.tenants["beta"].adapter_name
    classifier.text_head("beta")
    layer = text_layer(classifier, "beta")
    layer.svd_delta[name] = torch.nn.Parameter(layer.svd_delta[name].detach() * 2, requires_grad=False)
    misses = classifier.cache_info().misses
    classifier.text_head("beta")
    assert classifier.cache_info().misses == misses + 1
    entries = classifier.cache_info().entries
    classifier.unload_adapter("beta")
    assert classifier.cache_info().entries == entries - 1


def test_reload_replaces_the_adapter_and_its_features(classifier, adapters_dir, images, reference):
    before = classifier.classify([("alpha", images[0])])[0]
    tenant = classifier.load_adapter("alpha", os.path.join(adapters_dir, "beta"), replace=True,
                                     class_names=TENANTS["alpha"][0], template=TENANTS["alpha"][1])
    assert tenant.adapter_name not in {t.adapter_name for n, t in classifier.tenants.items() if n != "alpha"}
    after = classifier.classify([("alpha", images[0])])[0]
    assert not torch.allclose(after.probabilities, before.probabilities, atol=1e-4)
    assert len(classifier.model.peft_config) == 3  # the old adapter is gone


def test_set_classes(classifier, images):
    classifier.set_classes("beta", ["red", "green"], template="a photo of a {}.")
    result = classifier.classify([("beta", images[0])])[0]
    assert result.class_names == ("red", "green") and result.probabilities.shape == (2,)


def test_cache_stays_within_its_memory(clip_dir, adapters_dir, images):
    one_head = 4 * 16 * 4  # beta: 4 classes x 16 features x float32
    classifier = serving.MultiAdapterClassifier.from_pretrained(
        clip_dir, adapters_dir, max_cache_mb=(one_head + 8) / 2**20
    )
    for tenant in ("alpha", "beta", "gamma", "alpha"):
        classifier.classify([(tenant, images[0])])
        info = classifier.cache_info()
        assert info.bytes <= info.max_bytes and info.entries == 1
    assert classifier.cache_info().evictions == 3


def test_request_errors_are_raised_before_any_work(classifier, images):
    misses = classifier.cache_info().misses
    with pytest.raises(serving.UnknownTenantError, match=r"request 1: unknown tenant 'delta'; loaded: alpha, beta, gamma") as e:
        classifier.classify([("alpha", images[0]), ("delta", images[0])])
    assert e.value.index == 1
    with pytest.raises(serving.BadImageError, match="request 2: cannot decode the image") as e:
        classifier.classify([("alpha", images[0]), ("beta", images[1]), ("beta", b"not an image")])
    assert e.value.index == 2
    with pytest.raises(serving.BadImageError, match=r"float tensor \(3, H, W\)"):
        classifier.classify([("alpha", torch.zeros(1, 32, 32))])
    with pytest.raises(serving.BadImageError, match="NaN"):
        classifier.classify([("alpha", torch.full((3, 32, 32), float("nan")))])
    with pytest.raises(serving.BadImageError, match="not str"):
        classifier.classify([("alpha", "cat.png")])
    assert classifier.cache_info().misses == misses
    assert classifier.classify([]) == []


def test_adapter_of_another_base_model_is_refused_and_nothing_is_left(classifier, adapters_dir, tmp_path, images):
    other = save_adapter(str(tmp_path / "other"), None, seed=1, base_seed=7)
    adapters_before = set(classifier.model.peft_config)
    with pytest.raises(serving.AdapterLoadError, match="The SVD adapter 'other' was trained on a different base model"):
        classifier.load_adapter("other", other, class_names=["red", "blue"])
    assert "other" not in classifier and set(classifier.model.peft_config) == adapters_before
    # a failed reload keeps the tenant serving its old adapter
    before = classifier.classify([("alpha", images[0])])[0]
    with pytest.raises(serving.AdapterLoadError):
        classifier.load_adapter("alpha", other, class_names=["red", "blue"], replace=True)
    torch.testing.assert_close(classifier.classify([("alpha", images[0])])[0].probabilities, before.probabilities)


def test_first_adapter_refused_leaves_the_base_model_unwrapped(clip_dir, adapters_dir, tmp_path, images, reference):
    other = save_adapter(str(tmp_path / "other"), None, seed=1, base_seed=7)
    encoder = models.load_dual_encoder(clip_dir)
    classifier = serving.MultiAdapterClassifier(encoder)
    with pytest.raises(serving.AdapterLoadError, match="cannot be loaded onto base model"):
        classifier.load_adapter("other", other, class_names=["red", "blue"])
    assert classifier.model is None and not list(iter_svd_layers(encoder.model))
    classifier.load_adapter("alpha", os.path.join(adapters_dir, "alpha"))
    result = classifier.classify([("alpha", images[3])])[0]
    torch.testing.assert_close(result.probabilities, reference("alpha")[1][3], atol=ATOL, rtol=0)


def test_load_errors(classifier, clip_dir, adapters_dir, tmp_path):
    from peft import LoraConfig

    with pytest.raises(ValueError, match="already loaded; pass replace=True"):
        classifier.load_adapter("alpha", os.path.join(adapters_dir, "alpha"))
    with pytest.raises(ValueError, match="tenant name '../x'"):
        classifier.load_adapter("../x", os.path.join(adapters_dir, "alpha"))
    bare = save_adapter(str(tmp_path / "bare"), clip_dir, seed=4)  # no results.json
    with pytest.raises(serving.AdapterLoadError, match="records no class names.*pass class_names"):
        classifier.load_adapter("bare", bare)
    with pytest.raises(ValueError, match="at least two"):
        classifier.load_adapter("bare", bare, class_names=["red"])
    with pytest.raises(ValueError, match="distinct; repeated: red"):
        classifier.load_adapter("bare", bare, class_names=["red", "red"])
    with pytest.raises(ValueError, match="exactly one"):
        classifier.load_adapter("bare", bare, class_names=["red", "blue"], template="a photo")
    with pytest.raises(serving.AdapterLoadError, match="has no adapter_config.json"):
        classifier.load_adapter("empty", str(tmp_path), class_names=["red", "blue"])
    lora = models.adapt(models.load_dual_encoder(clip_dir).model, LoraConfig(target_modules=["q_proj"]))
    lora.save_pretrained(str(tmp_path / "lora"))
    with pytest.raises(serving.AdapterLoadError, match="LORA adapter; MultiAdapterClassifier serves SVD adapters"):
        classifier.load_adapter("lora", str(tmp_path / "lora"), class_names=["red", "blue"])
    assert sorted(classifier.tenants) == ["alpha", "beta", "gamma"]
    with pytest.raises(serving.UnknownTenantError):
        classifier.unload_adapter("lora")


def test_folder_loads_all_or_none(clip_dir, adapters_dir, tmp_path):
    import shutil

    folder = tmp_path / "adapters"
    shutil.copytree(adapters_dir, folder)
    (folder / "notes").mkdir()
    (folder / "README.md").write_text("tenants")
    classifier = serving.MultiAdapterClassifier.from_pretrained(clip_dir)
    with pytest.warns(peft_svd.PeftSVDWarning, match="notes has no adapter_config.json; not an adapter, skipped"):
        assert classifier.load_adapters_from(str(folder)) == ["alpha", "beta", "gamma"]
    save_adapter(str(folder / "zeta"), None, seed=1, base_seed=7)
    write_results(str(folder / "zeta"), ["red", "blue"], "a photo of a {}.")
    fresh = serving.MultiAdapterClassifier.from_pretrained(clip_dir)
    with pytest.warns(peft_svd.PeftSVDWarning), pytest.raises(serving.AdapterLoadError, match="zeta"):
        fresh.load_adapters_from(str(folder))
    assert fresh.tenants == {} and fresh.model is None


def test_batcher_gathers_concurrent_requests_and_fails_bad_ones_alone(classifier, images, reference):
    async def burst():
        batcher = serving.RequestBatcher(classifier, max_batch=8, max_wait_ms=200)
        await batcher.start()
        try:
            requests = [(t, images[i]) for t, i in mixed_requests(images)] + [("alpha", b"broken"), ("delta", images[0])]
            answers = await asyncio.gather(*(batcher.classify(t, im) for t, im in requests), return_exceptions=True)
        finally:
            await batcher.stop()
        return answers, batcher.stats

    answers, stats = asyncio.run(burst())
    good = mixed_requests(images)
    for (tenant, i), answer in zip(good, answers, strict=False):
        torch.testing.assert_close(answer.probabilities, reference(tenant)[1][i], atol=ATOL, rtol=0)
    assert isinstance(answers[-2], serving.BadImageError) and isinstance(answers[-1], serving.UnknownTenantError)
    assert stats.requests == len(good) and max(stats.sizes) == 8 and stats.batches == 2  # 9 good requests: 8 + 1


# -- examples/serve.py --------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(clip_dir, adapters_dir):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, os.path.join(REPO, "examples", "serve.py"), "--model", clip_dir, "--port", str(port),
               "--adapters", adapters_dir, "--lazy", "--adapter", f"first={os.path.join(adapters_dir, 'alpha')}",
               "--max-wait-ms", "300", "--max-batch", "16", "--threads", "1"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    import httpx

    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"examples/serve.py exited with {process.returncode}:\n{process.stdout.read()}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("examples/serve.py did not answer /health within 120 s")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def test_server_batches_a_burst_of_tenants_and_answers_as_each_adapter_alone(server, images, reference):
    import httpx

    assert httpx.get(f"{server}/v1/adapters").json()["adapters"][0]["name"] == "first"
    requests = [(t, i) for t, i in mixed_requests(images)] + [("first", i) for i in range(3)]
    encoded = {i: base64.b64encode(png_bytes(image)).decode() for i, image in enumerate(images)}
    start = threading.Barrier(len(requests))

    def send(request):
        tenant, i = request
        start.wait()  # the whole burst leaves at once
        return httpx.post(f"{server}/v1/classify", json={"adapter": tenant, "image": encoded[i], "top_k": 10}, timeout=60)

    with ThreadPoolExecutor(len(requests)) as pool:
        responses = list(pool.map(send, requests))
    sizes = []
    for (tenant, i), response in zip(requests, responses, strict=True):
        assert response.status_code == 200, response.text
        body = response.json()
        expected = reference("alpha" if tenant == "first" else tenant)[1][i]
        classes = TENANTS["alpha" if tenant == "first" else tenant][0]
        assert body["adapter"] == tenant and body["label"] == classes[int(expected.argmax())]
        got = torch.tensor([p["probability"] for p in sorted(body["top"], key=lambda p: classes.index(p["label"]))])
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        sizes.append(body["batch_size"])
    stats = httpx.get(f"{server}/v1/stats").json()
    assert stats["requests"] == len(requests) and max(sizes) > 1 and stats["batches"] < len(requests)
    assert stats["max_batch_size"] == max(sizes)
    loaded = {a["name"] for a in httpx.get(f"{server}/v1/adapters").json()["adapters"]}
    assert loaded == {"first", *TENANTS}  # the folder's adapters were loaded on first use

    unknown = httpx.post(f"{server}/v1/classify", json={"adapter": "delta", "image": encoded[0]})
    assert unknown.status_code == 404 and "unknown adapter 'delta'" in unknown.json()["detail"]
    traversal = httpx.post(f"{server}/v1/classify", json={"adapter": "../adapters", "image": encoded[0]})
    assert traversal.status_code == 404
    broken = httpx.post(f"{server}/v1/classify", json={"adapter": "alpha", "image": base64.b64encode(b"xx").decode()})
    assert broken.status_code == 422 and "cannot decode the image" in broken.json()["detail"]
    not_base64 = httpx.post(f"{server}/v1/classify", json={"adapter": "alpha", "image": "%%%"})
    assert not_base64.status_code == 422 and "not valid base64" in not_base64.json()["detail"]
    missing = httpx.post(f"{server}/v1/classify", json={"adapter": "alpha"})
    assert missing.status_code == 422


def test_server_flags_are_checked_before_anything_loads(tmp_path):
    script = os.path.join(REPO, "examples", "serve.py")
    for flags, message in (
        (["--adapter", "alpha"], "expected NAME=ADAPTER"),
        (["--lazy"], "--lazy loads adapters from the --adapters folder"),
        (["--adapters", str(tmp_path / "nowhere")], "is not a folder"),
    ):
        done = subprocess.run([sys.executable, script, *flags], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and message in done.stderr
