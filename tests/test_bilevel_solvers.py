"""Bilevel solvers on problems with known solutions (pure torch, no Lightning)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_zobi.bilevel import (
    BilevelProblem,
    GammaSchedule,
    ValueFunctionFree,
    ValueFunctionPenalty,
)


class CoupledQuadratic(nn.Module):
    """f = ½‖x − c‖² + ½‖y − d‖²,  g = ½‖y − A x − b‖² + ½ xᵀ B x.

    y*(x) = A x + b, so the bilevel solution solves (I + AᵀA) x = c + Aᵀ(d − b). The value
    function v(x) = ½ xᵀ B x is constant only when B = 0 (then the value-function-free method is exact).
    """

    def __init__(self, coupling: float) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("A", 0.5 * torch.randn(2, 3, generator=gen, dtype=torch.float64))
        self.register_buffer("b", torch.randn(2, generator=gen, dtype=torch.float64))
        self.register_buffer("c", torch.randn(3, generator=gen, dtype=torch.float64))
        self.register_buffer("d", torch.randn(2, generator=gen, dtype=torch.float64))
        self.register_buffer("B", coupling * torch.eye(3, dtype=torch.float64))
        self.x = nn.Parameter(torch.zeros(3, dtype=torch.float64))
        self.y = nn.Parameter(torch.zeros(2, dtype=torch.float64))

    def upper_loss(self, batch: object) -> torch.Tensor:
        return 0.5 * (self.x - self.c).pow(2).sum() + 0.5 * (self.y - self.d).pow(2).sum()

    def lower_loss(self, batch: object) -> torch.Tensor:
        r = self.y - self.A @ self.x - self.b
        return 0.5 * r.pow(2).sum() + 0.5 * self.x @ self.B @ self.x

    def bilevel_solution(self) -> tuple[torch.Tensor, torch.Tensor]:
        eye = torch.eye(3, dtype=torch.float64)
        x = torch.linalg.solve(eye + self.A.T @ self.A, self.c + self.A.T @ (self.d - self.b))
        return x, self.A @ x + self.b

    def penalty_solution(self, gamma: float, value_function: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Stationary point of f + γ(g − v) (value_function=True) or of f + γ g (False)."""
        A, eye3, eye2 = self.A, torch.eye(3, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
        top = eye3 + gamma * A.T @ A + (0 if value_function else gamma * self.B)
        H = torch.cat([torch.cat([top, -gamma * A.T], 1), torch.cat([-gamma * A, (1 + gamma) * eye2], 1)], 0)
        rhs = torch.cat([self.c - gamma * A.T @ self.b, self.d + gamma * self.b])
        sol = torch.linalg.solve(H, rhs)
        return sol[:3], sol[3:]


def _run(solver, steps: int) -> list[dict[str, float]]:
    return [solver.step(None) for _ in range(steps)]


def _problem(model: nn.Module) -> BilevelProblem:
    return BilevelProblem.from_module(model, upper_params="^x$", lower_params="^y$")


GAMMA = 50.0


@pytest.mark.parametrize("coupling", [0.0, 1.0])
def test_value_function_penalty_reaches_closed_form(coupling: float) -> None:
    """Penalty with K inner steps on z reaches the penalized optimum to 1e-6 and the bilevel one to O(1/γ)."""
    torch.manual_seed(0)
    model = CoupledQuadratic(coupling)
    opt = torch.optim.SGD(model.parameters(), lr=0.5 / GAMMA, momentum=0.9)
    # The x-gradient reads γ·∇ₓg(x, z): z must track y*(x) to ~1/γ, hence K = 5 steps of β = 0.8 (L_g = 1).
    solver = ValueFunctionPenalty(_problem(model), opt, gamma=GAMMA, inner_steps=5, inner_lr=0.8)
    logs = _run(solver, 400)
    x_pen, y_pen = model.penalty_solution(GAMMA, value_function=True)
    assert torch.allclose(model.x.detach(), x_pen, atol=1e-6)
    assert torch.allclose(model.y.detach(), y_pen, atol=1e-6)
    x_star, y_star = model.bilevel_solution()
    assert (model.x.detach() - x_star).norm() < 2.0 / GAMMA
    assert (model.y.detach() - y_star).norm() < 2.0 / GAMMA
    # z tracks argmin g(x, ·) = A x + b, so the gap is ½‖y − y*(x)‖² ≥ 0 and O(1/γ²).
    assert 0.0 <= logs[-1]["gap"] < 1.0 / GAMMA**2 * 10
    assert set(logs[-1]) == {"f", "g", "gap", "gamma", "objective"}


def test_value_function_free_exact_when_value_function_is_flat() -> None:
    """B = 0: v(x) ≡ 0, so PBGD-Free's single loop solves the same penalized problem as the penalty."""
    model = CoupledQuadratic(0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5 / GAMMA, momentum=0.9)
    solver = ValueFunctionFree(_problem(model), opt, gamma=GAMMA)
    logs = _run(solver, 600)
    x_star, _ = model.bilevel_solution()
    assert (model.x.detach() - x_star).norm() < 2.0 / GAMMA
    assert "gap" not in logs[-1]


def test_value_function_free_is_biased_when_value_function_is_not_flat() -> None:
    """B = I: dropping ∇v(x) = γ B x drags x to the stationary point of f + γ g, far from the bilevel x*."""
    model = CoupledQuadratic(1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5 / GAMMA, momentum=0.9)
    _run(ValueFunctionFree(_problem(model), opt, gamma=GAMMA), 600)
    x_free, _ = model.penalty_solution(GAMMA, value_function=False)
    x_star, _ = model.bilevel_solution()
    assert torch.allclose(model.x.detach(), x_free, atol=1e-6)
    assert (model.x.detach() - x_star).norm() > 0.3


class MinNormLeastSquares(nn.Module):
    """Simple bilevel: among the minimizers of g(y) = ½‖M y − r‖² (M is 2×5: a 3-dim affine set), pick
    the one minimizing f(y) = ½‖y‖², i.e. the minimum-norm solution y* = M⁺ r."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        rows = torch.linalg.qr(torch.randn(5, 2, generator=gen, dtype=torch.float64)).Q.T  # singular values 1
        self.register_buffer("M", rows)
        self.register_buffer("r", torch.randn(2, generator=gen, dtype=torch.float64))
        self.y = nn.Parameter(torch.randn(5, generator=gen, dtype=torch.float64))

    def training_step(self, batch: object, batch_idx: int) -> dict[str, torch.Tensor]:
        return {"upper": 0.5 * self.y.pow(2).sum(), "lower": 0.5 * (self.M @ self.y - self.r).pow(2).sum()}


@pytest.mark.parametrize("name", ["penalty", "vf_free"])
def test_simple_bilevel_picks_min_norm_solution(name: str) -> None:
    """Both solvers land on M⁺ r to O(1/γ); plain descent on g alone lands elsewhere in the solution set."""
    model = MinNormLeastSquares()
    y0 = model.y.detach().clone()
    problem = BilevelProblem.from_module(model)  # training_step returns {"upper", "lower"}; x = y = all
    assert problem.upper_params == problem.lower_params == [model.y]
    gamma = 100.0
    opt = torch.optim.SGD(model.parameters(), lr=0.9 / gamma, momentum=0.9)
    schedule = GammaSchedule(gamma, "geometric", gamma_init=1.0, ramp_steps=200)
    if name == "penalty":
        solver = ValueFunctionPenalty(problem, opt, gamma=schedule, inner_steps=2, inner_lr=1.0)
    else:
        solver = ValueFunctionFree(problem, opt, gamma=schedule)
    logs = _run(solver, 1500)
    assert logs[0]["gamma"] == pytest.approx(1.0) and logs[-1]["gamma"] == pytest.approx(gamma)
    y_star = torch.linalg.pinv(model.M) @ model.r
    assert (model.y.detach() - y_star).norm() < 5.0 / gamma
    assert (model.M @ model.y.detach() - model.r).norm() < 5.0 / gamma  # lower-level optimal

    # Baseline: gradient descent on g alone converges to the projection of y0, not to M⁺ r.
    y = y0.clone().requires_grad_(True)
    for _ in range(3000):
        (grad,) = torch.autograd.grad(0.5 * (model.M @ y - model.r).pow(2).sum(), y)
        y = (y - 1.0 * grad).detach().requires_grad_(True)
    assert (y.detach() - y_star).norm() > 0.5


def test_penalty_state_dict_restores_z_and_step() -> None:
    model = CoupledQuadratic(1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    solver = ValueFunctionPenalty(
        _problem(model), opt, gamma=GammaSchedule(10.0, "linear", 0.0, 10), inner_steps=2
    )
    _run(solver, 5)
    state = solver.state_dict()
    other_model = CoupledQuadratic(1.0)
    other_opt = torch.optim.SGD(other_model.parameters(), lr=0.01)
    other = ValueFunctionPenalty(_problem(other_model), other_opt)
    other.gamma_schedule = GammaSchedule(10.0, "linear", 0.0, 10)
    other.load_state_dict(state)
    assert other.step_count == 5 and other.gamma == pytest.approx(5.0)
    assert all(torch.equal(a, b) for a, b in zip(other.z, solver.z, strict=True))
    with pytest.raises(ValueError, match="solver 'penalty'"):
        ValueFunctionFree(_problem(other_model), other_opt).load_state_dict(state)


def test_bad_inputs_raise_clear_errors() -> None:
    model = CoupledQuadratic(0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="inner_steps"):
        ValueFunctionPenalty(_problem(model), opt, inner_steps=0)
    with pytest.raises(ValueError, match="gamma_schedule"):
        GammaSchedule(1.0, "cosine")
    with pytest.raises(ValueError, match="geometric"):
        GammaSchedule(1.0, "geometric", gamma_init=0.0)
    with pytest.raises(ValueError, match="upper_params='nothing_matches'"):
        BilevelProblem.from_module(model, upper_params="nothing_matches")
    with pytest.raises(ValueError, match="does not hold"):
        ValueFunctionPenalty(_problem(model), torch.optim.SGD([model.x], lr=0.1))
    model.y.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        ValueFunctionFree(_problem(model), opt)


class SingleLoss(nn.Module):
    """A module with one ordinary loss (training_step -> Tensor) and a bilevel_parameters() override."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(1.0))
        self.b = nn.Parameter(torch.tensor(2.0))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return (self.a * batch + self.b).pow(2).mean()

    def bilevel_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {"upper": [self.b], "lower": [self.a]}


def test_from_module_keys_halves_and_parameter_override() -> None:
    model = SingleLoss()
    batch = {"up": torch.tensor([1.0, 2.0]), "low": torch.tensor([3.0, -1.0])}
    keyed = BilevelProblem.from_module(
        model, upper_params="^a$", lower_params="^b$", upper_key="up", lower_key="low"
    )
    assert keyed.upper_params == [model.b] and keyed.lower_params == [model.a]  # bilevel_parameters() wins
    f, g = keyed.losses(batch)
    assert float(f) == pytest.approx(float(model.training_step(batch["up"], 0)))
    assert float(g) == pytest.approx(float(model.training_step(batch["low"], 0)))
    halves = BilevelProblem.from_module(model, split_batch=True)
    x = torch.tensor([1.0, 2.0, 3.0, -1.0])
    f, g = halves.losses(x)
    assert float(f) == pytest.approx(float(model.training_step(x[:2], 0)))
    assert float(g) == pytest.approx(float(model.training_step(x[2:], 0)))
    with pytest.raises(KeyError, match="upper_key='nope'"):
        BilevelProblem.from_module(model, upper_key="nope", lower_key="low").losses(batch)
    with pytest.raises(TypeError, match=r"\{'upper': f, 'lower': g\}"):
        BilevelProblem.from_module(model).losses(x)


def test_keep_best_z_never_lets_the_gap_go_negative() -> None:
    """A lagging copy (tiny inner steps) gives g(x, z) > g(x, y); the safeguard takes z ← y instead."""

    def gaps(keep: bool) -> list[float]:
        model = CoupledQuadratic(1.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        solver = ValueFunctionPenalty(_problem(model), opt, gamma=5.0, inner_lr=1e-3, keep_best_z=keep)
        return [row["gap"] for row in _run(solver, 60)]

    assert min(gaps(False)) < -1e-3  # the copy falls behind y without the safeguard
    assert min(gaps(True)) >= 0.0
