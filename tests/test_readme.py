"""The README starts with the two set-up commands, and CI runs the second one."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ci_runs_the_readme_test_command():
  lines = open(os.path.join(ROOT, "README.md")).read().splitlines()
  assert lines[0] == "```bash" and lines[3] == "```"
  demo, tests = lines[1], lines[2]
  assert demo.endswith("dsv32 demo") and "pytest" in tests
  assert tests in open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
