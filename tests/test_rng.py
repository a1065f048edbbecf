"""The RNG that defines the projection matrix: known answers and the entry spec, bit for bit.

The oracle here is written with plain Python integers and ``math`` straight from
shared/DESIGN.md, independently of fastattr.rng (torch) and csrc/philox.h (C++).
"""

import math

import pytest
import torch

import fastattr
from fastattr import rng
from fastattr.backends import load_extension

M32 = 0xFFFFFFFF
M64 = 0xFFFFFFFFFFFFFFFF

# Random123 known-answer vectors for Philox4x32-10: (counter, key) -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def py_philox(ctr, key):
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
        k0 = (k0 + 0x9E3779B9) & M32
        k1 = (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def py_mix(z):
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & M64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def py_entry(seed, ensemble_id, kind, i, j, k, stream=0):
    """R[i, j] straight from the spec, in float64 (before rounding to float32)."""
    key = py_mix(seed ^ py_mix(ensemble_id))
    keys = (key & M32, key >> 32)
    if kind == "rademacher":
        w = py_philox((i & M32, i >> 32, j // 128, stream), keys)
        bit = (w[(j % 128) // 32] >> (j % 32)) & 1
        return (1.0 if bit else -1.0) * rng.projection_scale(k)
    w = py_philox((i & M32, i >> 32, j // 4, stream), keys)
    pair = (w[0], w[1]) if j % 4 < 2 else (w[2], w[3])
    u0, u1 = (((x >> 8) + 0.5) * 2.0**-24 for x in pair)
    radius = math.sqrt(-2.0 * math.log(u0))
    value = radius * (math.cos(2 * math.pi * u1) if j % 2 == 0 else math.sin(2 * math.pi * u1))
    return value * rng.projection_scale(k)


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers_torch(ctr, key, expected):
    out = rng.philox4x32_10(*ctr, *key)
    assert tuple(int(w) for w in out) == expected
    assert py_philox(ctr, key) == expected


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers_cpp(ctr, key, expected):
    ext, err = load_extension("_C")
    assert ext is not None, err
    assert tuple(ext.philox4x32_10(*ctr, *key)) == expected


def test_philox_vectorised_matches_scalar():
    g = torch.Generator().manual_seed(3)
    ctr = torch.randint(0, 2**32, (4, 50), generator=g, dtype=torch.int64)
    out = torch.stack(rng.philox4x32_10(*ctr, 0x12345678, 0x9ABCDEF0))
    for n in range(50):
        col = tuple(int(c) for c in ctr[:, n])
        assert tuple(int(w) for w in out[:, n]) == py_philox(col, (0x12345678, 0x9ABCDEF0))


def test_philox_key_is_splitmix_of_seed_and_ensemble():
    for seed, eid in [(0, 0), (1, 0), (0, 1), (2**64 - 1, 7), (123456789, 2**40)]:
        key = py_mix(seed ^ py_mix(eid))
        assert rng.philox_key(seed, eid) == (key & M32, key >> 32)
        ext, _ = load_extension("_C")
        assert ext.philox_key(seed, eid) == key
    # no linear collisions: seed + 1000 * id style schemes collide here, this one does not
    keys = {rng.philox_key(seed, eid) for seed in range(0, 3000, 1000) for eid in range(3)}
    assert len(keys) == 9


@pytest.mark.parametrize("bad", [-1, 2**64, 1.5, True, "0"])
def test_philox_key_rejects_bad_seed(bad):
    with pytest.raises((TypeError, ValueError), match="seed"):
        rng.philox_key(bad, 0)


# Rows straddle the 32-bit boundary of the counter; columns straddle the 128-bit word blocks.
ROWS = [0, 1, 5, 2**32 - 1, 2**32, 2**32 + 3, 2**40 + 11]
COLS = [0, 1, 3, 4, 31, 32, 63, 64, 127, 128, 129, 255, 256, 300]


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_materialize_matches_spec(kind, backend):
    k = 301
    proj = fastattr.Projector(k, kind=kind, seed=2024, ensemble_id=3, backend=backend)
    mat = proj.materialize(torch.tensor(ROWS)).double()
    expected = torch.tensor(
        [[py_entry(2024, 3, kind, i, j, k) for j in COLS] for i in ROWS], dtype=torch.float64
    )
    got = mat[:, COLS]
    if kind == "rademacher":
        # +-scale exactly: float32(1/sqrt(k)) is what every backend writes
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * proj.scale)


def test_gaussian_entries_are_standard_normal():
    proj = fastattr.Projector(256, kind="gaussian", seed=1, backend="cpu")
    z = proj.materialize(2000).flatten().double() / proj.scale
    assert abs(z.mean()) < 0.01
    assert abs(z.std() - 1.0) < 0.01
    # tails are there (Box-Muller with u never 0 or 1: no inf, no exact 0 radius)
    assert torch.isfinite(z).all()
    assert (z.abs() > 4).any()


def test_rademacher_entries_are_balanced():
    proj = fastattr.Projector(1000, seed=5, backend="cpu")
    m = proj.materialize(1000)
    assert set(torch.unique(m).tolist()) == {-proj.materialize(1)[0].abs().max().item(),
                                             proj.materialize(1)[0].abs().max().item()}
    assert abs((m > 0).double().mean() - 0.5) < 0.005


# Words at the edges of the fp32 formulas: u near 0 and 1, the u = 1/2 branch switch, and
# angles at every quadrant boundary (2*pi*u crossing multiples of pi/2).
EDGE_WORDS = [0, 0xFF, 0x100, 0x7FFFFF00, 0x7FFFFFFF, 0x80000000, 0x800000FF, 0xFFFFFF00,
              0xFFFFFFFF, 0x3FFFFF00, 0x40000000, 0xBFFFFFFF, 0xC0000000, 0x1FFFFF00, 0x12345678]


def test_fp32_gaussian_formula_at_edges():
    ext, err = load_extension("_C")
    assert ext is not None, err
    for w0 in EDGE_WORDS:
        for w1 in EDGE_WORDS:
            z = ext.gaussian4(w0, w1, w0, w1)
            u0, u1 = (((x >> 8) + 0.5) * 2.0**-24 for x in (w0, w1))
            radius = math.sqrt(-2.0 * math.log(u0))
            cos, sin = radius * math.cos(2 * math.pi * u1), radius * math.sin(2 * math.pi * u1)
            # relative to the radius: a few fp32 ulp, even where the radius is 2**-12
            assert abs(z[0] - cos) <= 4e-7 * radius + 1e-30, (w0, w1, z[0], cos)
            assert abs(z[1] - sin) <= 4e-7 * radius + 1e-30, (w0, w1, z[1], sin)
            assert z[2] == z[0] and z[3] == z[1]
