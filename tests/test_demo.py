from beit3.demo import run_demo


def test_demo_loss_falls(capsys):
    losses = run_demo(steps=8)
    assert losses[-1] < 0.9 * losses[0]
    assert "not part of the demo yet" in capsys.readouterr().out
