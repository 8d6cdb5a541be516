#!/bin/bash
# Stand-in for MHub's buildutils/import_mhub_model.sh (written from its documented behaviour).
#   buildutils/import_mhub_model.sh <model_name> [<repo_url>::<branch>] [<branch>]
# Run in /app: fetches <branch> (default main) of <repo_url> (default MHub's models repository),
# merges it into a new repository in the current folder, narrows the checkout to
# models/<model_name> with a sparse checkout, then, as MHub's script does at its end, writes the
# merged commit's hash to buildutils/model_commit_hash.txt and removes the repository (.git).
set -e
NAME="$1"
SPEC="${2:-https://github.com/MHubAI/models.git::main}"
URL="${SPEC%%::*}"
BRANCH=""
case "$SPEC" in *::*) BRANCH="${SPEC#*::}" ;; esac
BRANCH="${BRANCH:-${3:-main}}"
if [ -z "$NAME" ]; then echo "Error: no model name provided." >&2; exit 1; fi
echo "import model ${NAME} from ${URL} (branch ${BRANCH})"
git init -q
git fetch -q "$URL" "$BRANCH"
git merge -q FETCH_HEAD
git sparse-checkout set "models/${NAME}"
mkdir -p buildutils
git rev-parse HEAD > buildutils/model_commit_hash.txt
rm -rf .git
