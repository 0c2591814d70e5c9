# The image that runs fedhosp's ServerApp / ClientApp: Flower's SuperExec plus the app's dependencies,
# installed at build time so that nothing is downloaded at run time (hospital nodes stay offline).
FROM flwr/superexec:1.42.0
USER root
COPY pyproject.toml README.md /app/
COPY server /app/server
COPY client /app/client
COPY models /app/models
RUN python -m pip install --no-cache-dir "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
 && python -m pip install --no-cache-dir /app
USER app
