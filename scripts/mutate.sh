#!/usr/bin/env bash
# Mutation testing of the core modules with mutmut 3 (`make mutate`; configuration: pyproject's
# [tool.mutmut]; the last run's numbers and the reading of its survivors: docs/mutation.md).
#
#   bash scripts/mutate.sh                 the default scope (below): 1,184 mutants, 93 min at one worker
#   bash scripts/mutate.sh GLOB...         other mutants, by name glob, e.g. 'allocsearch.study.ledger.*'
#   MUTATE_SCOPE='GLOB ...' make mutate    the same through make
#   MUTMUT_WORKERS=4 make mutate           more workers (default 1: the machine is shared)
#
# mutmut copies the package, tests/, pyproject.toml and the also_copy folders into mutants/ (git-ignored),
# records which tests reach each function, then runs each mutant against those tests only. Mutants are
# named <module>.x_<function>__mutmut_<n> or <module>.xǁ<Class>ǁ<method>__mutmut_<n>; mutmut mutates whole
# files, so part of one (budget.py's BudgetKeeper) is chosen by name, and mutants named on the command line
# are always run again (a run is a whole run; `rm -rf mutants` also drops the cached test map).
#
# Afterwards:
#   mutmut show <name>           the diff of one mutant, e.g.
#                                mutmut show 'allocsearch.search.rungs.xǁRungsǁstop__mutmut_29'
#   mutmut run <name>            run that one mutant again (after adding a test)
#   mutmut results               every mutant not killed (all files, name: status); mutmut browse: interactive
#
# The score is information, not a gate: this script exits 0 whatever it is (and non-zero only when mutmut
# itself could not run, e.g. the clean test run failed).
set -uo pipefail
cd "$(dirname "$0")/.."
export MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The selected tests read no datasets; conftest's CI guard would look for ../shared/datasets beside
# mutants/ (where it is not) and stop every run.
unset CI

# The default scope: the search's decisions (confidence: mean +- CI, ties, the winner; choice: the one best
# the study exports; the confirmation race
# and its reserve; noise-aware ASHA) and admission (budget.py's BudgetKeeper). The ledger, records.py and the
# rest of budget.py are in pyproject's only_mutate too but out of the default: every search test writes the
# ledger and builds records, so each surviving mutant there re-runs ~40 s of tests and the two files alone
# take another hour at one worker (docs/mutation.md). Run them by name as above.
DEFAULT_SCOPE='allocsearch.study.confidence.* allocsearch.study.choice.* allocsearch.search.confirmation.* allocsearch.search.rungs.* allocsearch.search.budget.x?BudgetKeeper?*'
if [ "$#" -gt 0 ]; then
  scope=("$@")
else
  read -r -a scope <<< "${MUTATE_SCOPE:-$DEFAULT_SCOPE}"
fi
echo "mutate: scope ${scope[*]}; ${MUTMUT_WORKERS:-1} worker(s)"

start=$(date +%s)
mutmut run --max-children "${MUTMUT_WORKERS:-1}" "${scope[@]}"
rc=$?
echo "mutate: mutmut run exited $rc after $(( $(date +%s) - start ))s wall"
if [ "$rc" -ne 0 ] || [ ! -d mutants ]; then
  echo "mutate: mutmut could not run (exit $rc; its output above says why); no result to report" >&2
  exit "$(( rc ? rc : 1 ))"
fi

mutmut results --all True > mutants/results-all.txt
MUTATE_GLOBS="${scope[*]}" ${PYTHON:-python3} - mutants/results-all.txt <<'PY'
import fnmatch
import os
import re
import sys
from collections import Counter, defaultdict

globs = os.environ["MUTATE_GLOBS"].split()
per, left = defaultdict(Counter), []
for line in open(sys.argv[1], encoding="utf-8"):
    # "    allocsearch.search.rungs.xǁRungsǁstop__mutmut_7: survived" (functions: "...rungs.x_name__mutmut_3")
    m = re.match(r"\s*((\S+?)\.x[_\u01c1]\S*): (.+)$", line.rstrip("\n"))
    if not m or not any(fnmatch.fnmatchcase(m.group(1), g) for g in globs):
        continue
    name, module, status = m.group(1), m.group(2), m.group(3).strip()
    per[module][status] += 1
    if status != "killed":
        left.append(f"    {name}: {status}")
cols = ["killed", "survived", "timeout", "no tests", "suspicious"]


def row(name, c):
    n = sum(c.values())
    other = n - sum(c[k] for k in cols)
    return f"{name:36}" + "".join(f"{c[k]:>11}" for k in cols) + f"{other:>7}{n:>7}{c['killed'] / n:>8.1%}"


print("\n== Result per module (score = killed / total; other = not checked, segfault, ...)")
print(f"{'module':36}" + "".join(f"{k:>11}" for k in cols) + f"{'other':>7}{'total':>7}{'score':>8}")
total = Counter()
for mod in sorted(per):
    total.update(per[mod])
    print(row(mod, per[mod]))
n = sum(total.values())
if not n:
    print("no mutants of the scope in `mutmut results`")
    sys.exit(0)
print(row("all", total))
print(f"\nmutation score: {total['killed']} killed / {n} mutants = {total['killed'] / n:.1%}")
others = {k: v for k, v in total.items() if k not in cols}
if others:
    print("other:", ", ".join(f"{k} {v}" for k, v in sorted(others.items())))
print(f"\n== Not killed ({len(left)}; the diff: mutmut show <name>)")
print("\n".join(left))
PY
exit 0
