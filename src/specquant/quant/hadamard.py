"""Hadamard matrices (entries +-1, H H^T = n I) of the orders rotations need.

    n = 2^k                  Sylvester:  H_2n = [[H_n, H_n], [H_n, -H_n]]
    n = m * 2^k              Paley I   (m = q + 1,     q prime, q = 3 mod 4)  kron  Sylvester
                             Paley II  (m = 2 (q + 1), q prime, q = 1 mod 4)  kron  Sylvester

SmolLM2's hidden size 576 = 36 * 16 uses Paley II with q = 17; 5120 = 20 * 256 Paley I
(q = 19); 3584 = 224 * 16 Paley I (q = 223). Paley over prime *powers* (e.g. 52 = 2(25 + 1))
needs finite-field arithmetic and is not built here; neither are other constructions (92).
"""

from __future__ import annotations

import torch


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    d = 2
    while d * d <= q:
        if q % d == 0:
            return False
        d += 1
    return True


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) for the quadratic character chi of GF(q), q prime."""
    squares = torch.zeros(q, dtype=torch.float64)
    squares[(torch.arange(1, q) ** 2) % q] = 1.0
    chi = torch.where(squares > 0, 1.0, -1.0).to(torch.float64)
    chi[0] = 0.0
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _conference(q: int) -> torch.Tensor:
    """[[0, 1^T], [+-1, Q]] of order q + 1: skew for q = 3 mod 4, symmetric for q = 1 mod 4."""
    sign = -1.0 if q % 4 == 3 else 1.0
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 0] = sign
    c[1:, 1:] = _jacobsthal(q)
    return c


def _paley(m: int) -> torch.Tensor | None:
    """A Paley Hadamard matrix of order m, or None when neither construction applies."""
    if _is_prime(m - 1) and (m - 1) % 4 == 3:  # Paley I: I + skew conference matrix
        return torch.eye(m, dtype=torch.float64) + _conference(m - 1)
    q = m // 2 - 1
    if m % 2 == 0 and _is_prime(q) and q % 4 == 1:  # Paley II: symmetric conference matrix
        a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        # off-diagonal +-1 -> +-a, zero diagonal -> b
        return torch.kron(_conference(q), a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


def hadamard(n: int) -> torch.Tensor:
    """An unnormalised Hadamard matrix of order n, float64 [n, n]."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"Hadamard order must be a positive integer, got {n!r}")
    k = 1
    while n % (2 * k) == 0:
        k *= 2
    m = n // k  # odd part; try m * 2^j for every split n = (m * 2^j) * 2^(rest)
    while True:
        if m == 1:
            return _sylvester(n)
        if m % 4 == 0:
            base = _paley(m)
            if base is not None:
                return torch.kron(base, _sylvester(n // m))
        if m == n:
            break
        m *= 2
    raise ValueError(
        f"no Hadamard matrix of order {n} can be built: supported orders are 2^k and "
        "m * 2^k with m = q + 1 (q prime, q = 3 mod 4) or m = 2(q + 1) (q prime, q = 1 mod 4)"
    )


def random_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """Q = H diag(s) / sqrt(n) with seeded random signs s: orthogonal, float64 [n, n]."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
    return hadamard(n) * signs[None, :] / n**0.5
