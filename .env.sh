cd /work/wt-tiles
export CARGO_PROFILE_DEV_DEBUG=0 CARGO_PROFILE_TEST_DEBUG=0
export ORT_DYLIB_PATH=/work/main/.venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1
export LIBTORCH=/work/main/.venv/lib/python3.11/site-packages/torch GANOMALY_PYTHON=/work/main/.venv/bin/python
export LD_LIBRARY_PATH=$LIBTORCH/lib:${LD_LIBRARY_PATH:-}
export MQTT_TEST_URL=mqtt://127.0.0.1:1883
