"""Tests of the ODE solvers against closed forms, convergence orders and diffrax."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from jaxdiff import ode

FIXED = {"euler": 1, "heun": 2, "rk4": 4}


def decay(t, y, args):
    return -args * y


def oscillator(t, y, omega):
    return {"x": y["v"], "v": -(omega**2) * y["x"]}


def test_exponential_decay_closed_form():
    k = jnp.array([0.5, 1.0, 3.0])
    y1, info = ode.solve(decay, jnp.ones(3), 0.0, 2.0, rtol=1e-7, atol=1e-7, args=k)
    np.testing.assert_allclose(y1, np.exp(-2.0 * np.asarray(k)), rtol=1e-5, atol=1e-7)
    assert bool(info["success"])
    assert float(info["t_final"]) == 2.0
    assert int(info["accepted"]) + int(info["rejected"]) == int(info["steps"])
    assert int(info["nfe"]) == 2 + 6 * int(info["steps"])


def test_linear_system_closed_form():
    a = jnp.array([[-0.5, 2.0, 0.0], [-2.0, -0.5, 0.3], [0.0, 0.1, -1.0]])
    y0 = jnp.array([1.0, -0.5, 2.0])
    y1, info = ode.solve(lambda t, y, a: a @ y, y0, 0.0, 1.5, rtol=1e-7, atol=1e-7, args=a)
    exact = scipy.linalg.expm(1.5 * np.asarray(a, np.float64)) @ np.asarray(y0, np.float64)
    np.testing.assert_allclose(y1, exact, rtol=1e-5, atol=1e-6)
    assert bool(info["success"])


def test_non_autonomous_closed_form():
    # dy/dt = cos(t) y  =>  y(t) = y0 exp(sin t)
    y1, _ = ode.solve(lambda t, y, a: jnp.cos(t) * y, jnp.ones(2), 0.0, 3.0, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(y1, np.exp(np.sin(3.0)), rtol=1e-5, atol=0)


@pytest.mark.parametrize("method", ["dopri5", *FIXED])
def test_harmonic_oscillator_pytree_state(method):
    omega = 2.0
    y0 = {"x": jnp.array([1.0, 0.0]), "v": jnp.array([0.0, 1.0])}
    kw = {"steps": 400} if method in FIXED else {"rtol": 1e-7, "atol": 1e-7}
    y1, info = ode.solve(oscillator, y0, 0.0, 3.0, method=method, args=omega, **kw)
    c, s = np.cos(omega * 3.0), np.sin(omega * 3.0)
    x_exact = np.array([c, s / omega])
    v_exact = np.array([-omega * s, c])
    tol = {"dopri5": 1e-5, "euler": 0.5, "heun": 1e-3, "rk4": 1e-6}[method]
    np.testing.assert_allclose(y1["x"], x_exact, rtol=0, atol=tol)
    np.testing.assert_allclose(y1["v"], v_exact, rtol=0, atol=omega * tol)
    assert set(y1) == {"x", "v"}
    assert bool(info["success"])


@pytest.mark.parametrize("method,order", list(FIXED.items()))
def test_convergence_order(method, order):
    # float64, so rk4's error stays far above round-off over the whole range of step sizes.
    with jax.enable_x64(True):
        y0 = jnp.ones((), jnp.float64)
        exact = np.exp(np.sin(2.0))
        step_counts = np.array([8, 16, 32, 64, 128])
        errors = []
        for n in step_counts:
            y1, info = ode.solve(lambda t, y, a: jnp.cos(t) * y, y0, 0.0, 2.0, method=method, steps=int(n))
            errors.append(abs(float(y1) - exact))
            assert int(info["nfe"]) == order * n  # stages per step equals the order for these three
        slope = np.polyfit(np.log(2.0 / step_counts), np.log(errors), 1)[0]
    np.testing.assert_allclose(slope, order, rtol=0, atol=0.15)


def test_dopri5_error_scales_with_tolerance():
    a = jnp.array([[-0.5, 2.0], [-2.0, -0.5]])
    y0 = jnp.array([1.0, 0.5])
    exact = scipy.linalg.expm(4.0 * np.asarray(a, np.float64)) @ np.asarray(y0, np.float64)
    tols = [1e-3, 1e-4, 1e-5, 1e-6]
    errors, nfes = [], []
    for tol in tols:
        y1, info = ode.solve(lambda t, y, a: a @ y, y0, 0.0, 4.0, rtol=tol, atol=tol, args=a)
        errors.append(float(np.max(np.abs(np.asarray(y1, np.float64) - exact))))
        nfes.append(int(info["nfe"]))
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:], strict=False)), errors
    assert all(n1 < n2 for n1, n2 in zip(nfes, nfes[1:], strict=False)), nfes
    for tol, err in zip(tols, errors, strict=True):
        assert err < 20 * tol, (tol, err)
    # Global error of a 5th-order method with local error control falls ~ tol^(5/5) .. tol^(4/5).
    slope = np.polyfit(np.log(tols), np.log(errors), 1)[0]
    assert 0.6 < slope < 1.2, slope


def test_dopri5_matches_diffrax():
    def f(t, y, args):
        return jnp.stack([y[1], -jnp.sin(y[0]) - 0.1 * y[1] + 0.3 * jnp.cos(t)])

    y0 = jnp.array([1.0, 0.0])
    y1, info = jax.jit(lambda y: ode.solve(f, y, 0.0, 5.0, rtol=1e-6, atol=1e-6))(y0)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(f),
        diffrax.Dopri5(),
        t0=0.0,
        t1=5.0,
        dt0=None,
        y0=y0,
        stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-6),
    )
    np.testing.assert_allclose(y1, sol.ys[-1], rtol=0, atol=2e-5)
    # Same method and tolerances: the work is comparable too.
    assert 0.5 < int(info["nfe"]) / int(sol.stats["num_steps"] * 6) < 2.0


def test_max_steps_failure_is_reported():
    # A stiff problem at a tight tolerance needs far more than 20 steps.
    y1, info = jax.jit(lambda y: ode.solve(decay, y, 0.0, 10.0, rtol=1e-9, atol=1e-9, max_steps=20, args=1000.0))(
        jnp.ones(2)
    )
    assert not bool(info["success"])
    assert int(info["steps"]) == 20
    assert int(info["nfe"]) == 2 + 6 * 20
    assert float(info["t_final"]) < 10.0
    assert np.all(np.isfinite(y1))


def test_nonfinite_vector_field_fails_without_hanging():
    y1, info = ode.solve(lambda t, y, a: y / 0.0 * 0.0, jnp.ones(2), 0.0, 1.0, max_steps=50)
    assert not bool(info["success"])
    assert int(info["accepted"]) == 0


def test_first_step_stays_inside_the_interval():
    # f is NaN beyond t = 1, and so slow that Hairer's unclipped trial step would land far past it.
    f = lambda t, y, args: 1e-4 * y * jnp.sqrt(1.0 - t)
    y1, info = ode.solve(f, jnp.ones(2), 0.0, 1.0, rtol=1e-6, atol=1e-6)
    assert bool(info["success"])
    np.testing.assert_allclose(y1, np.exp(1e-4 * 2 / 3), rtol=5e-6, atol=0)


def test_backward_integration():
    k = jnp.array([0.5, 2.0])
    y1, info = ode.solve(decay, jnp.ones(2), 1.0, -1.0, rtol=1e-7, atol=1e-7, args=k)
    np.testing.assert_allclose(y1, np.exp(2.0 * np.asarray(k)), rtol=1e-5, atol=0)
    assert float(info["t_final"]) == -1.0
    # Forward then backward returns to the start.
    y_fwd, _ = ode.solve(decay, jnp.ones(2), 0.0, 1.0, rtol=1e-7, atol=1e-7, args=k)
    y_back, _ = ode.solve(decay, y_fwd, 1.0, 0.0, rtol=1e-7, atol=1e-7, args=k)
    np.testing.assert_allclose(y_back, 1.0, rtol=1e-5, atol=0)


@pytest.mark.parametrize("method", ["dopri5", *FIXED])
def test_zero_length_interval(method):
    kw = {"steps": 3} if method in FIXED else {}
    y1, info = ode.solve(decay, jnp.full(2, 3.0), 0.5, 0.5, method=method, args=1.0, **kw)
    np.testing.assert_allclose(y1, 3.0, rtol=0, atol=0)
    assert bool(info["success"])


def test_nfe_counts_every_evaluation():
    calls = []

    def f(t, y, args):
        jax.debug.callback(lambda: calls.append(1))
        return -y

    _, info = jax.jit(lambda y: ode.solve(f, y, 0.0, 3.0, rtol=1e-6, atol=1e-6))(jnp.ones(2))
    jax.effects_barrier()
    assert int(info["rejected"]) >= 0
    assert len(calls) == int(info["nfe"])


def test_compiles_once():
    traces = []

    @jax.jit
    def run(y0, t1, tol):
        traces.append(1)
        return ode.solve(decay, y0, 0.0, t1, rtol=tol, atol=tol, args=1.0)

    for t1, tol in [(1.0, 1e-4), (2.0, 1e-6), (-1.0, 1e-5)]:
        y1, info = run(jnp.ones(3), t1, tol)
        np.testing.assert_allclose(y1, np.exp(-t1), rtol=30 * tol, atol=0)
        assert bool(info["success"])
    assert len(traces) == 1


@pytest.mark.parametrize("stage_loop", [False, True])
def test_per_example_step_sizes_with_vmap(stage_loop):
    rates = jnp.array([0.1, 1.0, 10.0, 30.0])

    def solve_one(y, k):
        return ode.solve(decay, y, 0.0, 1.0, rtol=1e-6, atol=1e-6, args=k, stage_loop=stage_loop)

    y1, info = jax.jit(jax.vmap(solve_one))(jnp.ones(4), rates)
    assert info["nfe"].shape == (4,)
    nfe = np.asarray(info["nfe"])
    assert np.all(np.diff(nfe) > 0), nfe  # stiffer examples take more steps
    for i in range(4):
        yi, info_i = jax.jit(solve_one)(jnp.ones(()), rates[i])
        np.testing.assert_allclose(y1[i], yi, rtol=1e-6, atol=1e-12)
        assert int(info_i["nfe"]) == nfe[i]
    np.testing.assert_allclose(y1, np.exp(-np.asarray(rates)), rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(info["success"]))


def test_batched_state_shares_one_step_size():
    rates = jnp.array([0.1, 30.0])
    _, info = ode.solve(decay, jnp.ones(2), 0.0, 1.0, rtol=1e-6, atol=1e-6, args=rates)
    assert info["nfe"].shape == ()


def test_argument_errors():
    with pytest.raises(ValueError, match="unknown method"):
        ode.solve(decay, jnp.ones(2), 0.0, 1.0, method="rk45")
    with pytest.raises(ValueError, match="needs steps"):
        ode.solve(decay, jnp.ones(2), 0.0, 1.0, method="rk4")
    with pytest.raises(ValueError, match="fixed-step"):
        ode.solve(decay, jnp.ones(2), 0.0, 1.0, steps=10)


@pytest.mark.parametrize("stage_loop, traces_auto_step, traces_given_step", [(True, 3, 2), (False, 8, 7)])
def test_stage_loop_traces_the_vector_field_once_per_step(stage_loop, traces_auto_step, traces_given_step):
    # In a loop, the six stages of a step share one traced copy of f, so a large score network is compiled into
    # the solve three times (first evaluation, first-step probe, step) instead of eight.
    traces = []

    def f(t, y, args):
        traces.append(t)
        return -y

    jax.jit(lambda y: ode.solve(f, y, 0.0, 1.0, stage_loop=stage_loop))(jnp.ones(3))
    assert len(traces) == traces_auto_step
    traces.clear()
    jax.jit(lambda y: ode.solve(f, y, 0.0, 1.0, dt0=0.1, stage_loop=stage_loop))(jnp.ones(3))
    assert len(traces) == traces_given_step


def test_stage_loop_is_chosen_by_the_size_of_the_field():
    small = lambda t, y, args: -y  # noqa: E731

    def large(t, y, args):
        for _ in range(ode.STAGE_LOOP_MIN_OPS):
            y = y * 0.999
        return -y

    assert ode._field_ops(small, 0.0, jnp.ones(3), None) < ode.STAGE_LOOP_MIN_OPS <= ode._field_ops(
        large, 0.0, jnp.ones(3), None
    )
    for f in (small, large):
        auto = jax.jit(lambda y, f=f: ode.solve(f, y, 0.0, 1.0))(jnp.ones(3))
        for stage_loop in (True, False):
            forced = jax.jit(lambda y, f=f, s=stage_loop: ode.solve(f, y, 0.0, 1.0, stage_loop=s))(jnp.ones(3))
            np.testing.assert_allclose(forced[0], auto[0], rtol=1e-6)
            assert int(forced[1]["nfe"]) == int(auto[1]["nfe"])
