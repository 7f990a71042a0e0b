// Portolan status page: live updates over server-sent events, countdowns and ages
// kept current between them. The page works without it (a server-rendered snapshot).
'use strict';
(function () {
  var board = document.getElementById('board');
  var live = document.getElementById('live');
  var cut = document.getElementById('cut');
  // Server clock minus ours, in seconds: countdowns follow the watcher's clock.
  var offset = 0;

  function sync() {
    var b = board.querySelector('.board');
    var now = b ? Number(b.getAttribute('data-now')) : 0;
    if (now) offset = now - Date.now() / 1000;
  }

  function ago(s) {
    if (s < 120) return s + ' s';
    if (s < 7200) return Math.floor(s / 60) + ' min';
    if (s < 172800) return Math.floor(s / 3600) + ' h';
    return Math.floor(s / 86400) + ' d';
  }

  function tick() {
    var now = Date.now() / 1000 + offset;
    board.querySelectorAll('[data-until]').forEach(function (el) {
      el.textContent = Math.max(0, Math.round(Number(el.getAttribute('data-until')) - now)) + ' s';
    });
    board.querySelectorAll('[data-since]').forEach(function (el) {
      el.textContent = ago(Math.max(0, Math.round(now - Number(el.getAttribute('data-since')))));
    });
  }

  function state(on) {
    live.textContent = on ? 'live' : 'cut';
    live.className = 'live ' + (on ? 'on' : 'off');
    cut.hidden = on;
    document.body.setAttribute('data-stream', on ? 'live' : 'cut');
  }

  sync();
  tick();
  setInterval(tick, 1000);
  if (!window.EventSource) return;
  var es = new EventSource('/api/events');
  es.onopen = function () { state(true); };
  es.onerror = function () { state(false); };
  es.addEventListener('board', function (e) {
    // The watcher's own rendering of the board, every value from etcd escaped there.
    board.innerHTML = e.data;
    state(true);
    sync();
    tick();
  });
})();
