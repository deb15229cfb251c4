# Installation of ksmvm and its systemd units. The top-level Makefile
# includes this file:
#
#   include vmm/systemd/install.mk
#
#   make install                      # binary, units, /etc/ksmvm, examples
#   make install DESTDIR=/tmp/pkg PREFIX=/usr
#   make install-probe                # the probe guest the probe example uses
#   make systemd-test-rootfs          # cached Debian rootfs for tests/systemd.rs

CARGO ?= cargo
PREFIX ?= /usr
BINDIR ?= $(PREFIX)/bin
# systemd looks in /usr/lib/systemd/system and /usr/local/lib/systemd/system.
UNITDIR ?= $(PREFIX)/lib/systemd/system
SYSCONFDIR ?= /etc
DOCDIR ?= $(PREFIX)/share/doc/ksmvm
KSMVM_SYSTEMD_DIR := vmm/systemd
KSMVM_UNITS := ksmvm@.service ksmvm-ksm.service

.PHONY: install install-bin install-units install-examples install-probe uninstall systemd-test-rootfs

install: install-bin install-units install-examples

install-bin:
	$(MAKE) ksmvm
	install -D -m 0755 target/vmm/ksmvm $(DESTDIR)$(BINDIR)/ksmvm

# The units name /usr/bin/ksmvm; point them at BINDIR.
install-units:
	install -d -m 0755 $(DESTDIR)$(UNITDIR)
	for u in $(KSMVM_UNITS); do \
		sed 's|/usr/bin/ksmvm|$(BINDIR)/ksmvm|g' $(KSMVM_SYSTEMD_DIR)/$$u > $(DESTDIR)$(UNITDIR)/$$u && \
		chmod 0644 $(DESTDIR)$(UNITDIR)/$$u || exit 1; \
	done
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi

# /etc/ksmvm holds one NAME.toml per instance (ksmvm@NAME) and ksm.toml;
# the examples go to the documentation, not into /etc, so that nothing
# starts or tunes KSM until an administrator writes a file there.
install-examples:
	install -d -m 0755 $(DESTDIR)$(SYSCONFDIR)/ksmvm
	install -d -m 0755 $(DESTDIR)$(DOCDIR)/examples
	install -m 0644 $(KSMVM_SYSTEMD_DIR)/examples/*.toml $(DESTDIR)$(DOCDIR)/examples/

install-probe: probe
	install -D -m 0644 $(PROBE) $(DESTDIR)$(PREFIX)/lib/ksmvm/probe

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/ksmvm $(DESTDIR)$(PREFIX)/lib/ksmvm/probe
	for u in $(KSMVM_UNITS); do rm -f $(DESTDIR)$(UNITDIR)/$$u; done
	rm -rf $(DESTDIR)$(DOCDIR)

systemd-test-rootfs:
	tests/systemd/make-rootfs.sh
