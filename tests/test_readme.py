"""CI runs the README's own install and test lines."""

import re


def test_ci_runs_the_readme_commands():
  readme = open("README.md").read()
  ci = open(".ci/run").read()
  blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
  install, test = blocks[0].strip(), blocks[2].strip()
  assert install in ci and test in ci
