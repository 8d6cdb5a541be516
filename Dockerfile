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

# our package: its own venv with a Python >= 3.10 (uv, shipped in the base image, provides one)
ARG CXR_LUNG_RISK_SOURCE="cxr-lung-risk"
RUN uv venv --python-preference only-managed -p 3.11 /app/venv \
  && uv pip install -n -p /app/venv "${CXR_LUNG_RISK_SOURCE}"

# the published weights (CXR-Lung-Risk, Zenodo 7941660) fetched and verified at build time,
# so that the container runs with --network none
ENV CXR_LUNG_RISK_HOME=/app/weights
RUN /app/venv/bin/cxr-lung-risk fetch-weights

# Import the MHub model definition (config/, utils/, meta.json)
ARG MHUB_MODELS_REPO
RUN buildutils/import_mhub_model.sh cxr_lung_risk ${MHUB_MODELS_REPO}

# the MHub modules find the CLI here (overrides: workflow config `cli`, this variable)
ENV CXR_LUNG_RISK_CLI=/app/venv/bin/cxr-lung-risk

ENTRYPOINT ["mhub.run"]
CMD ["--workflow", "default"]
