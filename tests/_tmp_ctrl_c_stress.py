import os, signal, time
from beit3.pretrain.checkpoints import latest_whole
from beit3.sample_data import tiny_recipe
from training_fixtures import write_recipe
from test_ctrl_c import launch_in_own_session, wait_for, tracebacks, INTERRUPTED

def test_stress(training_data, tmp_path):
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(run_dir, training_data, steps=100_000, log_every_steps=1,
                         checkpoint={"every_steps": 2, "keep_last": 2}, eval={"every_steps": 3})
    config = write_recipe(tmp_path / "recipe.yaml", recipe)
    for attempt, trigger in enumerate(["step ", "eval ", "step "]):
        launcher = launch_in_own_session(config, *(["--resume"] if attempt else []))
        seen = 0
        lines = []
        for line in launcher.stdout:
            lines.append(line)
            if line.startswith(trigger):
                seen += 1
                if seen == 4:
                    os.killpg(launcher.pid, signal.SIGINT)
                    break
        rest, _ = launcher.communicate(timeout=120)
        output = "".join(lines) + rest
        print("ATTEMPT", attempt, trigger, launcher.returncode, [l for l in output.splitlines() if "interrupted" in l], tracebacks(output),
              "KeyboardInterrupt" in output)
        if len(tracebacks(output)) != 1 or "KeyboardInterrupt" in output or "SignalException" not in output:
            print(output[-5000:])
