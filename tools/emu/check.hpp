// check.hpp: selftest_emu.cpp's verdict: one check line per case (a mismatch count) and
// finish() with the emulator's own report. Include after the kernel file (which brings in
// kernels/emu.cuh through common.cuh).
#pragma once
#include <cstdio>
#include <string>

static int failures = 0;

// An exact check (mismatch count).
static void check_exact(const std::string& name, long bad) {
    std::printf("%-4s %-66s %ld mismatches\n", bad ? "FAIL" : "ok", name.c_str(), bad);
    if (bad) failures++;
}

// Ends the self-test: the emulator's own report (errors, ldmatrix bank conflicts), then the verdict.
static int finish() {
    failures += emu_report();
    std::printf(failures ? "FAILED (%d)\n" : "all ok\n", failures);
    return failures ? 1 : 0;
}
