# MHub container for CXR-Lung-Risk (https://mhub.ai conventions: standalone, no COPY/ADD).
#
#   docker build -t cxr_lung_risk --build-arg MHUB_MODELS_REPO=<models repo>::<branch> .
#   docker run --rm --gpus all --network none \
#     -v /abs/in:/app/data/input_data:ro -v /abs/out:/app/data/output_data cxr_lung_risk
#
# mhubio in the base image needs pydicom 2.x; this package needs pydicom 3 and highdicom, so it is
# installed into its own venv (/app/venv) and the MHub modules in utils/ call its CLI
# (/app/venv/bin/cxr-lung-risk) as a subprocess.
FROM mhubai/base:latest

LABEL authors="cxr-lung-risk maintainers"

# Import the MHub model definition: this repository (config/, utils/, meta.json, and the package
# source with scripts/install.sh) into /app/models/cxr_lung_risk
ARG MHUB_MODELS_REPO
RUN buildutils/import_mhub_model.sh cxr_lung_risk ${MHUB_MODELS_REPO}

# our package, in its own venv, by the README's install command (scripts/install.sh); the base
# image's Python is too old (3.8), so a Python 3.11 from uv (shipped in the base image) runs it
RUN uv python install 3.11 \
  && cd /app/models/cxr_lung_risk \
  && PYTHON="$(uv python find 3.11)" bash scripts/install.sh /app/venv

# the published weights (CXR-Lung-Risk, Zenodo 7941660; CXR-Age) fetched and verified at build
# time, so that the container runs with --network none
ENV CXR_LUNG_RISK_HOME=/app/weights
RUN /app/venv/bin/cxr-lung-risk fetch-weights --model all --no-progress

# the MHub modules find the CLI here (overrides: workflow config `cli`, this variable)
ENV CXR_LUNG_RISK_CLI=/app/venv/bin/cxr-lung-risk

ENTRYPOINT ["mhub.run"]
CMD ["--workflow", "default"]
