"""fastattr's projector for dattri (``pip install dattri``), dattri 0.3's calling convention.

``random_project(feature, feature_batch_size, proj_dim, ...)`` returns a function
``project(feature, ensemble_id=0) -> Tensor[B, proj_dim]``, exactly like
``dattri.func.projection.random_project``::

    from fastattr.integrations.dattri import random_project

    project = random_project(grads, feature_batch_size=grads.shape[0], proj_dim=4096,
                             proj_max_batch_size=32, proj_type="rademacher")
    feats = project(grads, ensemble_id=0)

The signature follows dattri 0.3 (``proj_seed`` 5th, ``proj_type`` 6th, keyword-only
``device``). This function does not need dattri.

How dattri's attributors reach a projector (dattri 0.3.0). None of them takes a projector
object: ``TRAKAttributor``, ``TracInAttributor``, ``DVEmbAttributor`` and the
block-projected influence functions (``LoGraAttributor``, ``FactGraSSAttributor``, through
``dattri.algorithm.block_projected_if.core.compressor``) call the name ``random_project``
that their module imported from ``dattri.func.projection``; their ``projector_kwargs``
are only the keywords of that call. Hence two ways in:

* ``DVEmbAttributor`` keeps the projection function it built in an attribute and builds
  one only when the attribute is empty, so assigning fastattr's is the hook:
  ``attributor.projector = random_project(...)`` (``factorization_type="none"``) or
  ``attributor.random_projectors = [(project_in, project_out), ...]`` (factorized).
* For the others, ``with use_fastattr_projection(): ...`` rebinds ``random_project`` in
  those attributor modules to fastattr's for the duration of the block (dense kinds;
  dattri's own function still serves "sjlt", "identity", ...), and restores it on exit.

Behaviour, compared with dattri's dense projectors (``proj_type`` "normal"/"rademacher"):

* Same scale: entries are +-1/sqrt(proj_dim) or N(0, 1/proj_dim), as dattri 0.3's
  ``BasicProjector`` (which divides by sqrt(proj_dim)).
* The matrix is fastattr's: a pure function of ``(proj_seed, ensemble_id, kind,
  proj_dim)``, identical on every device, backend and batch split; its entries differ from
  dattri's (torch generator / fast_jl), the distribution does not.
* Output dtype: like dattri 0.3, the dtype of ``feature`` given here (fp32 gradients give
  fp32 features). The input is never down-cast: every dtype is read as it is and
  accumulated in fp32; only the result is stored in that dtype.
* ``use_half_precision`` (the keyword of dattri <= 0.2, where it made dattri *compute*
  in bfloat16): ``None`` (default) keeps the dattri 0.3 rule above; ``True`` stores the
  result in bfloat16 (the storage dtype dattri 0.2 returned) while the projection itself
  is still computed from the unrounded input with fp32 accumulation; ``False`` returns
  float32.
* ``proj_max_batch_size`` only tunes dattri's CUDA kernels; it is accepted and unused.
* Only the dense kinds exist here; "sjlt", "random_mask", "grass" and "identity" raise
  ``ValueError`` (use dattri's own ``random_project`` for those).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import ModuleType

import torch

from ..backends import check_backend_name
from ..projection import Projector
from ._args import as_index

__all__ = ["random_project", "use_fastattr_projection"]

_KIND_OF = {"normal": "gaussian", "gaussian": "gaussian", "rademacher": "rademacher"}
_DATTRI_ONLY = {"sjlt", "random_mask", "grass", "identity"}
_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _is_dattri_only(proj_type) -> bool:
    """True for dattri's kinds that fastattr does not implement ("sjlt", "grass_4", ...)."""
    value = getattr(proj_type, "value", proj_type)  # dattri's ProjectionType is a str Enum
    return isinstance(value, str) and (value in _DATTRI_ONLY or value.startswith("grass"))


def _kind(proj_type) -> str:
    value = getattr(proj_type, "value", proj_type)
    if isinstance(value, str) and value in _KIND_OF:
        return _KIND_OF[value]
    if _is_dattri_only(value):
        raise ValueError(
            f"proj_type {value!r} is a dattri-only projection; fastattr provides the dense "
            "'normal' (Gaussian) and 'rademacher' projections. Use "
            "dattri.func.projection.random_project for the others."
        )
    raise ValueError(f"proj_type must be 'normal' or 'rademacher', got {proj_type!r}")


def _layers(feature, arg: str) -> list[tuple[str, torch.Tensor]]:
    if isinstance(feature, torch.Tensor):
        return [(arg, feature)]
    if isinstance(feature, Mapping):
        items = [(f"{arg}[{name!r}]", t) for name, t in feature.items()]
        if not items:
            raise ValueError(f"{arg} is an empty dict")
        for name, t in items:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        return items
    raise TypeError(
        f"{arg} must be a Tensor [batch, feature_dim] or a dict of tensors [batch, ...], "
        f"got {type(feature).__name__}"
    )


def random_project(
    feature,
    feature_batch_size: int,
    proj_dim: int,
    proj_max_batch_size: int = 32,
    proj_seed: int = 0,
    proj_type=None,
    *,
    device=None,
    use_half_precision: bool | None = None,
    kind: str | None = None,
    backend: str = "auto",
    check_finite: bool = False,
) -> Callable:
    """Build a projection function for features shaped like ``feature`` (dattri's API).

    Args:
        feature: an example feature: ``Tensor[feature_batch_size, feature_dim]`` or a dict
            of per-parameter tensors ``{name: [feature_batch_size, ...]}``; fixes
            ``feature_dim`` and the output dtype.
        feature_batch_size: batch size of ``feature`` (each tensor's ``numel`` is
            ``feature_batch_size * per-sample size``, as dattri computes it).
        proj_dim: output dimension.
        proj_max_batch_size: dattri's CUDA tuning knob; unused.
        proj_seed: seed of the matrix.
        proj_type: ``"normal"`` (dattri's default) or ``"rademacher"``, or dattri's
            ``ProjectionType``. ``kind`` is fastattr's name for the same choice
            (``"gaussian"`` / ``"rademacher"``); give one or agreeing values.
        device: where to project; inputs elsewhere are moved there, as dattri does.
            ``None``: on each input's own device.
        use_half_precision: see the module docstring (the input is never rounded).
        backend: fastattr backend (``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"``,
            ``"reference"``).
        check_finite: raise ``ValueError`` on NaN/Inf features.

    Returns:
        ``project(feature, ensemble_id=0) -> Tensor[batch, proj_dim]``; each
        ``ensemble_id`` uses an independent matrix (a fastattr ``Projector`` per id,
        cached). Any batch size is accepted; the per-sample layout must match ``feature``.

    Example::

        import torch
        from fastattr.integrations.dattri import random_project

        grads = torch.randn(8, 1000)
        project = random_project(grads, 8, 128, 32, 0, "rademacher")
        feats = project(grads, ensemble_id=1)      # Tensor[8, 128], float32
        # dict of per-parameter gradients: projected as their flat concatenation
        project = random_project({"w": grads[:, :900].reshape(8, 30, 30),
                                  "b": grads[:, 900:]}, 8, 128)
    """
    if isinstance(proj_seed, (str, torch.device)):
        raise TypeError(
            "proj_seed must be an int, got a device: dattri >= 0.3 orders the arguments "
            "(feature, feature_batch_size, proj_dim, proj_max_batch_size, proj_seed, "
            "proj_type); pass device= by keyword"
        )
    feature_batch_size = as_index("feature_batch_size", feature_batch_size)
    proj_dim = as_index("proj_dim", proj_dim)
    proj_seed = as_index("proj_seed", proj_seed)
    if proj_max_batch_size is not None:
        as_index("proj_max_batch_size", proj_max_batch_size)
    if feature_batch_size < 1:
        raise ValueError(f"feature_batch_size must be >= 1, got {feature_batch_size}")

    if kind is None and proj_type is None:
        kind = "gaussian"  # dattri 0.3's default proj_type "normal"
    elif kind is None:
        kind = _kind(proj_type)
    else:
        if kind not in ("gaussian", "rademacher"):
            raise ValueError(f"kind must be 'gaussian' or 'rademacher', got {kind!r}")
        if proj_type is not None and _kind(proj_type) != kind:
            raise ValueError(f"proj_type={proj_type!r} and kind={kind!r} disagree")

    layers = _layers(feature, "feature")
    feature_dim = 0
    for name, t in layers:
        if t.numel() % feature_batch_size:
            raise ValueError(
                f"{name} has {t.numel()} elements, not a multiple of "
                f"feature_batch_size={feature_batch_size}"
            )
        feature_dim += t.numel() // feature_batch_size
    if feature_dim < 1:
        raise ValueError("feature has no elements")
    layout = [(name, math.prod(t.shape[1:]) if t.dim() else 0) for name, t in layers]

    if use_half_precision is None:
        out_dtype = layers[0][1].dtype
    else:
        out_dtype = torch.bfloat16 if use_half_precision else torch.float32
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"feature must be a floating tensor, got {out_dtype}")
    target = None if device is None else torch.device(device)
    if target is not None and target.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a cpu or cuda device, got {target}")

    check_backend_name(backend)
    projectors: dict[int, Projector] = {}

    def projector(ensemble_id: int) -> Projector:
        ensemble_id = as_index("ensemble_id", ensemble_id)
        proj = projectors.get(ensemble_id)
        if proj is None:
            proj = Projector(proj_dim, kind=kind, seed=proj_seed, ensemble_id=ensemble_id,
                             backend=backend, check_finite=check_finite)
            projectors[ensemble_id] = proj
        return proj

    projector(0)  # validate proj_dim / seed / backend here, not at the first call

    def _random_project_func(feature, ensemble_id: int = 0) -> torch.Tensor:
        """Project ``feature`` (Tensor [B, feature_dim] or dict) with matrix ``ensemble_id``."""
        items = _layers(feature, "feature")
        if isinstance(feature, torch.Tensor):
            if feature.dim() != 2 or feature.shape[1] != feature_dim:
                raise ValueError(
                    f"feature must have shape [batch, {feature_dim}], got {tuple(feature.shape)}"
                )
        else:
            got = sum(math.prod(t.shape[1:]) for _, t in items if t.dim())
            if got != feature_dim:
                raise ValueError(
                    f"feature has {got} entries per sample, but the projector was built for "
                    f"feature_dim={feature_dim} (layout {layout})"
                )
        if target is not None:
            if isinstance(feature, torch.Tensor):
                feature = feature.to(target)
            else:
                feature = {name: t.to(target) for name, t in feature.items()}
        out = projector(ensemble_id).project(feature)
        return out if out.dtype == out_dtype else out.to(out_dtype)

    _random_project_func.feature_dim = feature_dim
    _random_project_func.proj_dim = proj_dim
    _random_project_func.kind = kind
    _random_project_func.projector = projector
    return _random_project_func


# dattri 0.3.0's modules that call ``random_project`` through the name they imported.
DATTRI_CALLERS = (
    "dattri.algorithm.trak",  # TRAKAttributor
    "dattri.algorithm.tracin",  # TracInAttributor (TracIn, Grad-Dot, Grad-Cos, ...)
    "dattri.algorithm.dvemb",  # DVEmbAttributor (or assign attributor.projector)
    "dattri.algorithm.block_projected_if.core.compressor",  # LoGra, FactGraSS
)


def _dattri_random_project() -> Callable:
    """dattri's own ``random_project`` (0.3 signature), or an error saying what is missing."""
    try:
        from dattri.func import projection
    except ImportError as exc:
        raise ImportError(
            "use_fastattr_projection needs dattri: `pip install dattri` "
            f"(importing dattri.func.projection failed: {exc})"
        ) from exc
    original = projection.random_project
    if "proj_type" not in inspect.signature(original).parameters:
        raise RuntimeError(
            "use_fastattr_projection needs dattri >= 0.3 (its random_project takes "
            "proj_type); this dattri's does not"
        )
    return original


def _caller_modules(modules) -> list[ModuleType]:
    if modules is None:
        found = []
        for name in DATTRI_CALLERS:
            try:
                found.append(importlib.import_module(name))
            except ImportError:  # absent from this dattri, or its optional deps are
                continue
        return found
    if isinstance(modules, (str, ModuleType)):
        modules = [modules]
    if not isinstance(modules, Iterable):
        raise TypeError(f"modules must be module names or modules, got {type(modules).__name__}")
    found = []
    for module in modules:
        if isinstance(module, str):
            module = importlib.import_module(module)
        elif not isinstance(module, ModuleType):
            raise TypeError(
                f"modules must be module names or modules, got {type(module).__name__}"
            )
        if not callable(getattr(module, "random_project", None)):
            raise ValueError(f"modules: {module.__name__} has no random_project to replace")
        found.append(module)
    return found


@contextlib.contextmanager
def use_fastattr_projection(
    modules=None, *, backend: str = "auto", check_finite: bool = False
) -> Iterator[list[ModuleType]]:
    """Make dattri's attributors project with fastattr inside a ``with`` block.

    dattri 0.3 has no projector argument (see the module docstring): its attributors call
    the ``random_project`` their module imported. Inside the block that name, in each of
    ``modules``, is a function with dattri's exact signature and return convention which
    projects the dense kinds ("normal", "rademacher") with fastattr's ``random_project``
    and hands every other kind ("sjlt", "identity", "random_mask", "grass_N") to dattri's
    own. On exit the previous bindings come back (also after an exception). The
    rebinding is process-wide for the duration of the block (every thread sees it);
    nested blocks restore in order. ``projector_kwargs`` keep their dattri meaning.

    Args:
        modules: the modules to rebind, as names or module objects. ``None``: those of
            ``DATTRI_CALLERS`` that import here (TRAK, TracIn, DVEmb, LoGra/FactGraSS).
        backend: fastattr backend for the projections (``"auto"``, ``"cpu"``, ``"cuda"``,
            ``"triton"``, ``"reference"``).
        check_finite: raise ``ValueError`` on NaN/Inf features.

    Yields:
        the list of modules rebound.

    Example::

        from dattri.algorithm.trak import TRAKAttributor
        from fastattr.integrations.dattri import use_fastattr_projection

        attributor = TRAKAttributor(task, correct_probability_func,
                                    projector_kwargs={"proj_dim": 2048, "device": "cuda"})
        with use_fastattr_projection():
            attributor.cache(train_loader)
            scores = attributor.attribute(test_loader)
    """
    check_backend_name(backend)
    dattri_random_project = _dattri_random_project()
    targets = _caller_modules(modules)

    def random_project_for_dattri(
        feature,
        feature_batch_size,
        proj_dim,
        proj_max_batch_size,
        proj_seed=0,
        proj_type="normal",
        *,
        device="cpu",
    ):
        if _is_dattri_only(proj_type):
            return dattri_random_project(feature, feature_batch_size, proj_dim,
                                         proj_max_batch_size, proj_seed, proj_type,
                                         device=device)
        return random_project(feature, feature_batch_size, proj_dim, proj_max_batch_size,
                              proj_seed, proj_type, device=device, backend=backend,
                              check_finite=check_finite)

    saved = [(module, module.random_project) for module in targets]
    for module in targets:
        module.random_project = random_project_for_dattri
    try:
        yield targets
    finally:
        for module, previous in reversed(saved):
            if module.random_project is random_project_for_dattri:
                module.random_project = previous
