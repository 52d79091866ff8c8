for v in "0 0" "1 0" "1 256"; do timeout 120 python3 benchmarks/_debug_mgpu.py $v 2>&1 | grep -v "^E1124\|^===\|^external\|^$" | tail -4; done
which compute-sanitizer; ls /usr/local/cuda*/bin 2>/dev/null | head
