# adapterd container image: a build stage running the same deploy/setup.sh the README uses,
# and a runtime stage with only the shared libraries (OpenBLAS included), a non-root user,
# tini as PID 1 (SIGTERM reaches adapterd, which drains), and a gRPC health check.
#
#   podman build --isolation chroot --pull=never -t localhost/adapterd:dev .   (see deploy/container.sh)
#   docker run --network host -v MODEL:/models/base:ro -v ADAPTERS:/adapters:ro adapterd:dev
FROM debian:bookworm-slim AS build
WORKDIR /src
# setup.sh compiles through ccache: mount a cache at /ccache (deploy/container.sh mounts the
# host's, whose checkout-relative entries a build in /src/build hits) or leave it empty.
ENV CCACHE_DIR=/ccache
COPY CMakeLists.txt ./
COPY proto proto
COPY core core
COPY adapters adapters
COPY jinja jinja
COPY server server
COPY deploy/setup.sh deploy/setup.sh
RUN deploy/setup.sh --server-only /src/build \
    && strip /src/build/server/adapterd /src/build/server/adapterctl

FROM debian:bookworm-slim
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       libtorch1.13 libopenblas0-openmp libgrpc++1.51 libprotobuf32 libabsl20220623 \
       libspdlog1.10 libprometheus-cpp-core1.0 liburcu8 libpcre2-8-0 libutf8proc2 libcpp-httplib0.11 tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin adapterd
COPY --from=build /src/build/server/adapterd /src/build/server/adapterctl /usr/local/bin/
USER 10001
# Generation (gRPC), admin (gRPC), metrics (HTTP), the OpenAI-compatible API (HTTP).
EXPOSE 50051 50052 9400 8000
VOLUME ["/models", "/adapters"]
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD ["adapterctl", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/adapterd"]
CMD ["serve", "--model_dir=/models/base", "--adapter_root=/adapters", \
     "--listen=0.0.0.0:50051", "--admin_listen=127.0.0.1:50052", "--metrics_listen=0.0.0.0:9400", "--http_listen=0.0.0.0:8000"]
