# syntax=docker/dockerfile:1
# Images for compose.yaml, one target each:
#   node     the hpb-node service (SCP, STOW-RS, admin API, scheduler, workers)
#   orthanc  Debian's Orthanc with DICOMweb + the Python plugin and orthanc/hpb_router.py
#            (the same packages the tests run against)
#   viewer   the built OHIF viewer (@ohif/app 3.12.10 dist, as pinned in tests/ohif)
#            behind nginx, with Orthanc's DICOMweb proxied on the same origin
# Base images are pinned by version tag; pin them by digest in your registry
# mirror for fully reproducible builds.

# ---------------------------------------------------------------- node
FROM python:3.11.11-slim-bookworm AS node
ARG TORCH_INDEX_URL=""
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 hpb \
 && useradd --system --uid 10001 --gid hpb --home-dir /var/lib/hpb-node --create-home hpb
WORKDIR /opt/hpb-node
COPY pyproject.toml README.md ./
COPY constraints/ constraints/
COPY node/ node/
COPY models/ models/
COPY dicom_sr/ dicom_sr/
# A CPU-only torch keeps the image small; pass --build-arg TORCH_INDEX_URL=<your
# CPU wheel index> to take torch from there, or leave it empty for PyPI's build.
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --index-url "$TORCH_INDEX_URL" -c constraints/test.txt torch; \
    fi \
 && pip install -c constraints/test.txt '.[postgres]' \
 && python -c "import node, models, dicom_sr"
USER hpb
WORKDIR /var/lib/hpb-node
ENV HPB_SPOOL_ROOT=/var/lib/hpb-node/spool
EXPOSE 11112 8043
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=5 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8043/api/health', timeout=4).status != 200)"]
ENTRYPOINT ["hpb-node"]
CMD ["--config", "/etc/hpb-node/node.yaml", "serve"]

# ---------------------------------------------------------------- orthanc
FROM debian:bookworm-20241223-slim AS orthanc
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        orthanc orthanc-dicomweb orthanc-python orthanc-gdcm curl ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/orthanc/db && chown -R orthanc:orthanc /var/lib/orthanc
COPY orthanc/orthanc.json /etc/orthanc/orthanc.json
COPY orthanc/hpb_router.py /etc/orthanc/hpb_router.py
USER orthanc
EXPOSE 4242 8042
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=5 \
  CMD ["sh", "-c", "curl -fsS -u \"admin:$ORTHANC_ADMIN_PASSWORD\" http://127.0.0.1:8042/system >/dev/null"]
ENV TCP_NODELAY=1
CMD ["Orthanc", "/etc/orthanc/orthanc.json"]

# ---------------------------------------------------------------- viewer
FROM node:20.18.1-bookworm-slim AS viewer-build
WORKDIR /build
COPY tests/ohif/package.json tests/ohif/package-lock.json ./
COPY tests/ohif/dep-stub/ dep-stub/
RUN npm ci --ignore-scripts --no-audit --no-fund --omit=dev

FROM nginx:1.27.3-alpine AS viewer
COPY --from=viewer-build /build/node_modules/@ohif/app/dist/ /usr/share/nginx/html/
COPY tests/ohif/app-config.js /usr/share/nginx/html/app-config.js
COPY orthanc/viewer/nginx.conf.template /etc/nginx/templates/default.conf.template
RUN rm -f /etc/nginx/conf.d/default.conf
EXPOSE 3000
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=5 \
  CMD ["wget", "-q", "-O", "/dev/null", "http://127.0.0.1:3000/app-config.js"]
