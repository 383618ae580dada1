// The backend-independent checks and set-up (csrc/cbn_common.cpp), compiled into the
// emulated backend's own library (cbn_ext._emu has no link to cbn_ext._C).
#include "../cbn_common.cpp"
