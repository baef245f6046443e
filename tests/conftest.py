import logging

import pytest
import timm
import torch

torch.set_num_threads(2)

TINY = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=4, depth=2, num_classes=10)),
    "swin": ("swin_tiny_patch4_window7_224",
             dict(img_size=32, window_size=4, embed_dim=32, depths=(1, 1), num_heads=(2, 2), num_classes=10)),
    "swinv2": ("swinv2_tiny_window8_256",
               dict(img_size=32, window_size=4, embed_dim=32, depths=(1, 1), num_heads=(2, 2), num_classes=10)),
    "resnet": ("resnet18", dict(num_classes=10)),
    "convnext": ("convnext_atto", dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), num_classes=10)),
}


def tiny_model(kind: str, seed: int = 0):
    name, kw = TINY[kind]
    torch.manual_seed(seed)
    return timm.create_model(name, **kw)


def densified_as_stock(model, name: str, kw: dict, x):
    """``densify_`` the trained sparse model, load its state strictly into a stock ``timm.create_model(name,
    **kw)``, assert both give the same logits on ``x`` and return the stock model."""
    import sparsity

    model.eval()
    with torch.no_grad():
        ref = model(x)
    sparsity.densify_(model)
    fresh = timm.create_model(name, **kw)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(x), ref, atol=1e-5)
    return fresh


@pytest.fixture
def one_thread():
    """Small tensors on a shared 2-core box: one intra-op thread is faster and steadier."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _quiet_logs():
    logging.getLogger("sparsity").setLevel(logging.WARNING)
    yield


def run_group(cmd, timeout, **kwargs):
    """subprocess.run for multi-process commands (torchrun): on timeout the whole process group is killed, so no
    orphaned worker outlives the test."""
    import os
    import signal
    import subprocess

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(map(str, cmd[:4]))} ...\n{err[-2000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
